"""rtd_loss against the Hugging Face path, forward and forward+backward.

    python -m benchmarks.rtd_loss          # on a GPU: B*L = 16384, H = 768 and 1024, bf16 and fp16

The HF path is what ElectraForPreTraining runs: dense_prediction (nn.Linear(H, 1)) -> squeeze -> boolean-mask select
of active tokens -> BCEWithLogitsLoss. Bytes moved: hidden read once forward; read again and d_hidden written backward.
"""

import torch
import torch.nn.functional as F

from electra_triton.ops import rtd_loss

from .common import Bench, forward_backward, print_standalone


def hf_rtd_loss(hidden, weight, bias, labels, attention_mask):
    logits = F.linear(hidden, weight, bias).squeeze(-1)
    active = attention_mask.view(-1, hidden.shape[1]) == 1
    return F.binary_cross_entropy_with_logits(logits.view(-1, hidden.shape[1])[active], labels[active].float())


def run(bench: Bench, shapes: list[tuple[int, int, int]] | None = None) -> list[dict]:
    """Every (B, L, H) (TOY: a small one), or the given `shapes` only."""
    shapes = shapes or ([(2, 16, 64)] if bench.toy else [(32, 512, 768), (32, 512, 1024)])
    rows = []
    for (batch, seq_len, hidden_size), dtype in [(s, d) for s in shapes for d in bench.dtypes]:
        def make_inputs(batch=batch, seq_len=seq_len, hidden_size=hidden_size, dtype=dtype):
            hidden = torch.randn(batch, seq_len, hidden_size, device=bench.device, dtype=dtype, requires_grad=True)
            weight = (torch.randn(1, hidden_size, device=bench.device, dtype=dtype) * 0.02).requires_grad_()
            bias = torch.zeros(1, device=bench.device, dtype=dtype, requires_grad=True)
            labels = torch.randint(0, 2, (batch, seq_len), device=bench.device)
            mask = (torch.arange(seq_len, device=bench.device) < seq_len * 7 // 8).long().expand(batch, -1)
            return hidden, weight, bias, labels, mask

        inputs = [make_inputs() for _ in range(bench.rotations)]
        n_tokens, element = batch * seq_len, inputs[0][0].element_size()
        small_bytes = n_tokens * (8 + 8 + 4)  # labels, mask (int64), fp32 logits
        hidden_bytes = n_tokens * hidden_size * element
        case = f"B*L={n_tokens} H={hidden_size}"
        for impl, fn in (("electra_triton", rtd_loss), ("hf", hf_rtd_loss)):
            with torch.no_grad():
                timing = bench.time_ms(fn, inputs)
            rows.append(bench.row(op="rtd_loss", impl=impl, case=case, dtype=dtype, pass_="fwd", timing=timing,
                                  bytes_moved=hidden_bytes + small_bytes))
            timing = bench.time_ms(lambda *args, fn=fn: forward_backward(fn, *args), inputs)
            rows.append(bench.row(op="rtd_loss", impl=impl, case=case, dtype=dtype, pass_="fwd+bwd", timing=timing,
                                  bytes_moved=3 * hidden_bytes + 2 * small_bytes))
    return rows


COLUMNS = ("op", "impl", "case", "dtype", "pass", "ms", "gbps", "fraction_of_ceiling")

if __name__ == "__main__":
    print_standalone(run, COLUMNS)
