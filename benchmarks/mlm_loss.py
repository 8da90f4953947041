"""The generator head (ops.generator_head) against what the unpatched pre-trainer runs, forward and forward+backward.

    python -m benchmarks.mlm_loss          # on a GPU: 2,528 masked rows x 30,522 tokens, E = 768 and 1024, bf16, fp16

Rows: 32 sequences x 79 prediction slots of 512 tokens (max_predictions(512, 0.15)), ELECTRA's setting. E is the
width the LM head sees: the generator's embedding size (768 for base, 1024 for large; its hidden size 256 is
projected up by generator_predictions first). The stock path is ElectraPretrainer's unpatched head: logits =
F.linear, fp32 cross-entropy, Gumbel-max sampling in fp32 (pretrain.model.gumbel_sample) and an argmax for accuracy;
on a GPU also torch.compile of it. FLOPs: the logits GEMM 2*R*V*E forward, 3x that forward+backward.
"""

import functools

import torch
import torch.nn.functional as F

from electra_triton.ops import generator_head
from electra_triton.pretrain.model import gumbel_sample, max_predictions

from .common import Bench, print_standalone

VOCAB = 30522
SHAPES = [(32 * max_predictions(512, 0.15), VOCAB, 768), (32 * max_predictions(512, 0.15), VOCAB, 1024)]
TOY_SHAPES = [(8, 64, 8)]


def stock_head(hidden, weight, bias, labels, temperature=1.0):
    logits = F.linear(hidden, weight, bias)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    return loss, gumbel_sample(logits, temperature), logits.detach().argmax(-1)


def fused_head(hidden, weight, bias, labels, temperature=1.0):
    return generator_head(hidden, weight, bias, labels, temperature)


def _make_inputs(bench: Bench, n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype):
    hidden = torch.randn(n_rows, hidden_size, device=bench.device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab_size, hidden_size, device=bench.device, dtype=dtype) * 0.02).requires_grad_()
    bias = torch.zeros(vocab_size, device=bench.device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab_size, (n_rows,), device=bench.device)
    labels[torch.rand(n_rows, device=bench.device) < 0.05] = -100  # a few unused slots, as short sequences leave
    return hidden, weight, bias, labels


def _loss_backward(fn):
    def step(*inputs):
        fn(*inputs)[0].backward()

    return step


def run(bench: Bench) -> list[dict]:
    impls = [("electra_triton", fused_head), ("stock", stock_head)]
    if bench.device.type == "cuda":
        impls.append(("stock+compile", torch.compile(stock_head)))
    rows = []
    for (n_rows, vocab_size, hidden_size), dtype in [(s, d) for s in (TOY_SHAPES if bench.toy else SHAPES)
                                                     for d in bench.dtypes]:
        inputs = [_make_inputs(bench, n_rows, vocab_size, hidden_size, dtype) for _ in range(bench.rotations)]
        case = f"{'TOY ' if bench.toy else ''}R={n_rows} V={vocab_size} E={hidden_size}"
        flops = 2 * n_rows * vocab_size * hidden_size
        for impl, fn in impls:
            with torch.no_grad():
                timing = bench.time_ms(fn, inputs)
            rows.append(bench.row(op="mlm_loss", impl=impl, case=case, dtype=dtype, pass_="fwd", timing=timing,
                                  flops=flops))
            step = _loss_backward(fn)
            timing = bench.time_ms(step, inputs)
            peak = bench.peak_memory_gb(functools.partial(step, *inputs[0]))
            rows.append(bench.row(op="mlm_loss", impl=impl, case=case, dtype=dtype, pass_="fwd+bwd", timing=timing,
                                  flops=3 * flops, peak_mem_gb=peak))
    return rows


COLUMNS = ("op", "impl", "case", "dtype", "pass", "ms", "tflops", "fraction_of_ceiling", "peak_mem_gb")

if __name__ == "__main__":
    print_standalone(run, COLUMNS)
