"""gelu_linear against eager F.linear + F.gelu, cuBLAS F.linear alone, and torch.compile of the eager pair.

    python -m benchmarks.gelu_linear       # on a GPU: M = B*L = 16384, the ELECTRA (K, N) shapes, bf16 and fp16

FLOPs: 2*M*N*K forward, 3x that forward+backward (dX and dW GEMMs). Targets (issue 4, H100 bf16): forward at most
1.05x the time of F.linear alone on the FFN shapes; forward+backward >= 1.2x faster than eager and no slower than
torch.compile. F.linear alone is timed forward only (it is the floor for the forward, not an alternative for the
backward, which also differentiates through the GELU).
"""

import torch
import torch.nn.functional as F

from electra_triton.ops import gelu_linear

from .common import Bench, forward_backward, print_standalone

# (K, N) of ELECTRA's GEMMs: FFN up/down projections of base and large, attention/heads (K = N), small's FFN.
SHAPES = [(768, 3072), (3072, 768), (768, 768), (256, 1024), (1024, 256), (1024, 4096), (4096, 1024)]


def eager(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


def linear_only(x, weight, bias):
    return F.linear(x, weight, bias)


def make_inputs(bench: Bench, n_rows: int, K: int, N: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = torch.randn(n_rows, K, device=bench.device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(N, K, device=bench.device, dtype=dtype) / K**0.5).requires_grad_()
    bias = torch.zeros(N, device=bench.device, dtype=dtype, requires_grad=True)
    return x, weight, bias


def run(bench: Bench, shapes: list[tuple[int, int]] | None = None) -> list[dict]:
    """Every (K, N) of SHAPES (TOY: two small ones), or the given `shapes` only."""
    n_rows, default_shapes = (64, [(40, 24), (32, 48)]) if bench.toy else (16384, SHAPES)
    shapes = shapes or default_shapes
    impls = [("electra_triton", gelu_linear), ("eager", eager)]
    notes = {}
    if bench.device.type == "cuda":
        impls.append(("torch.compile", torch.compile(eager, dynamic=False)))
    else:
        notes["torch.compile"] = "not timed on CPU (toy run)"
    rows = []
    for (K, N), dtype in [(s, d) for s in shapes for d in bench.dtypes]:
        inputs = [make_inputs(bench, n_rows, K, N, dtype) for _ in range(bench.rotations)]
        flops = 2 * n_rows * N * K
        case = f"M={n_rows} K={K} N={N}"
        for impl, fn in [*impls, ("cublas_linear", linear_only)]:
            with torch.no_grad():
                timing = bench.time_ms(fn, inputs)
            rows.append(bench.row(op="gelu_linear", impl=impl, case=case, dtype=dtype, pass_="fwd", timing=timing,
                                  flops=flops))
        for impl, fn in impls:
            timing = bench.time_ms(lambda *args, fn=fn: forward_backward(fn, *args), inputs)
            peak = bench.peak_memory_gb(lambda fn=fn, first=inputs[0]: forward_backward(fn, *first))
            rows.append(bench.row(op="gelu_linear", impl=impl, case=case, dtype=dtype, pass_="fwd+bwd", timing=timing,
                                  flops=3 * flops, peak_mem_gb=peak))
        for impl, note in notes.items():
            rows.append({"op": "gelu_linear", "impl": impl, "case": case, "dtype": str(dtype).removeprefix("torch."),
                         "pass": "fwd+bwd", "ms": None, "note": note})
    return rows


COLUMNS = ("op", "impl", "case", "dtype", "pass", "ms", "tflops", "fraction_of_ceiling", "peak_mem_gb", "note")

if __name__ == "__main__":
    print_standalone(run, COLUMNS)
