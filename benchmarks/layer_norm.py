"""dropout_add_layer_norm against eager PyTorch (F.dropout, add, F.layer_norm) and torch.compile of it.

    python -m benchmarks.layer_norm        # on a GPU: 16384 rows, ELECTRA hidden sizes, bf16 and fp16

Cases: the blocks' post-attention and post-FFN norm (residual, dropout 0.1: training) and the embeddings' norm (no
residual); for 16-bit dtypes also the residual stream under autocast ("fp32 params": 16-bit x and residual, fp32
weight and bias; eager then normalises in fp32 and returns fp32, as transformers' LayerNorm does under autocast).
Bytes moved are the fused minimum, the same for every impl so that GB/s compare: forward reads x (and the residual)
and writes y; the backward reads dy, x (and the residual: the mask and the sum are recomputed) and writes dx (and
d_residual). Target (issue 4, H100 bf16): forward+backward at >= 80 % of the measured copy bandwidth, >= 2x eager.
"""

import torch
import torch.nn.functional as F

from electra_triton.ops import dropout_add_layer_norm

from .common import Bench, forward_backward, print_standalone

EPS = 1e-12


def eager(x, residual, weight, bias, dropout_p):
    h = F.dropout(x, dropout_p)
    h = h if residual is None else h + residual
    return F.layer_norm(h if h.dtype == weight.dtype else h.float(), x.shape[-1:], weight, bias, EPS)


def ours(x, residual, weight, bias, dropout_p):
    return dropout_add_layer_norm(x, residual, weight, bias, EPS, dropout_p)


def make_inputs(bench: Bench, n_rows: int, hidden: int, residual: bool, dtype: torch.dtype,
                param_dtype: torch.dtype) -> tuple:
    def tensor(*shape, fill=None, dtype=dtype):
        if fill is None:
            return torch.randn(*shape, device=bench.device, dtype=dtype, requires_grad=True)
        return torch.full(shape, fill, device=bench.device, dtype=dtype, requires_grad=True)

    x = tensor(n_rows, hidden)
    return (x, tensor(n_rows, hidden) if residual else None, tensor(hidden, fill=1.0, dtype=param_dtype),
            tensor(hidden, fill=0.0, dtype=param_dtype))


def run(bench: Bench, sizes: list[int] | None = None) -> list[dict]:
    """Every hidden size (TOY: two small ones), or the given `sizes` only."""
    n_rows, default_sizes = (64, [40, 256]) if bench.toy else (16384, [256, 768, 1024])
    sizes = sizes or default_sizes
    impls = [("electra_triton", ours), ("eager", eager)]
    if bench.device.type == "cuda":
        impls.append(("torch.compile", torch.compile(eager, dynamic=False)))
    rows = []
    cases = [(n, r, d, d) for n in sizes for r in (True, False) for d in bench.dtypes]
    cases += [(n, True, d, torch.float32) for n in sizes for d in bench.dtypes if d != torch.float32]
    for hidden, residual, dtype, param_dtype in cases:
        dropout_p = 0.1
        inputs = [(*make_inputs(bench, n_rows, hidden, residual, dtype, param_dtype), dropout_p)
                  for _ in range(bench.rotations)]
        tensor_bytes = n_rows * hidden * inputs[0][0].element_size()
        n_in = 2 if residual else 1
        fwd_bytes = (n_in + 1) * tensor_bytes
        params = " fp32 params" if param_dtype != dtype else ""
        case = f"rows={n_rows} N={hidden} {'residual' if residual else 'embeddings'}{params} p={dropout_p}"
        for impl, fn in impls:
            with torch.no_grad():
                timing = bench.time_ms(fn, inputs)
            rows.append(bench.row(op="dropout_add_layer_norm", impl=impl, case=case, dtype=dtype, pass_="fwd",
                                  timing=timing, bytes_moved=fwd_bytes))
            timing = bench.time_ms(lambda *args, fn=fn: forward_backward(fn, *args), inputs)
            rows.append(bench.row(op="dropout_add_layer_norm", impl=impl, case=case, dtype=dtype, pass_="fwd+bwd",
                                  timing=timing, bytes_moved=fwd_bytes + (2 * n_in + 1) * tensor_bytes))
    return rows


COLUMNS = ("op", "impl", "case", "dtype", "pass", "ms", "gbps", "fraction_of_ceiling")

if __name__ == "__main__":
    print_standalone(run, COLUMNS)
