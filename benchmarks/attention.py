"""attention against torch SDPA (each backend forced where it accepts the case) and HF's eager attention.

    python -m benchmarks.attention          # on a GPU: 16k tokens, H = 12, D = 64, L in {128, 512, 1024}, bf16, fp16

Cases: with and without a key-padding mask (sequence lengths uniform in [L/2, L], right-padded) and attention
dropout 0.1, forward, backward (alone, from a retained graph) and forward+backward; plus a varlen batch of ~16k real
tokens with lengths uniform in [32, 512], where the padded impls run on the batch padded to 512. The qkv-packed ops
(`electra_triton-qkvpacked`, `electra_triton-varlen-qkvpacked`) run each case on one (B, L, 3, H, D) / (T, 3, H, D)
leaf, as the output of a fused QKV projection, and return its one gradient.

FLOPs follow FlashAttention: 4 * B * H * L^2 * D forward, 2.5x that backward, whatever the mask (masked work still
runs in every padded impl). The varlen case counts only the real tokens' work (4 * H * D * sum(l_i^2)) for every
impl, so its TFLOP/s are effective rates and the padded impls look as slow as the padding makes them.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from electra_triton.ops import attention, attention_qkvpacked, attention_varlen, attention_varlen_qkvpacked

from .common import Bench, print_standalone

OP = "attention"
DROPOUT = 0.1
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


def hf_eager(q, k, v, mask, dropout_p):
    """transformers' eager_attention_forward (BERT/ELECTRA) with the additive mask HF builds for it."""
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    probs = torch.nn.functional.dropout(scores.softmax(dim=-1), p=dropout_p, training=True)
    return torch.matmul(probs, v)


def sdpa(backend):
    def fn(q, k, v, mask, dropout_p):
        with sdpa_kernel(backend):
            bias = None if mask is None else mask[:, None, None, :].bool()
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return fn


def impls(has_mask: bool) -> dict:
    fns = {"electra_triton": lambda q, k, v, mask, p: attention(q, k, v, mask, p), "hf-eager": hf_eager}
    for name, backend in SDPA_BACKENDS.items():
        if name == "sdpa-flash" and has_mask:
            continue  # refuses any mask by construction
        fns[name] = sdpa(backend)
    return fns


def _hf_layout(batch, seqlen, heads, head_dim, device, dtype):
    """q, k, v as HF hands them to attention: (B, H, L, D) views of (B, L, H, D), with grads."""
    return [torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
            for _ in range(3)]


def _time_passes(bench, impl, fn, input_sets, case, dtype, flops_fwd, **extra) -> list[dict]:
    """fwd, bwd and fwd+bwd rows of fn(*inputs) -> out; a backend that refuses the case gives one 'refused' row."""
    def fwd_bwd(*inputs):
        out = fn(*inputs)
        return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad],
                                   torch.ones_like(out))

    try:
        with torch.no_grad():
            fwd = bench.time_ms(fn, input_sets)
        graphs = []
        for inputs in input_sets:
            out = fn(*inputs)
            graphs.append((out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad],
                           torch.ones_like(out)))
        bwd = bench.time_ms(lambda out, leaves, grad: torch.autograd.grad(out, leaves, grad, retain_graph=True), graphs)
        del graphs
        both = bench.time_ms(fwd_bwd, input_sets)
        memory = bench.peak_memory_gb(lambda: fwd_bwd(*input_sets[0]))
    except RuntimeError as error:  # SDPA: "No available kernel" for this case
        message = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        return [{"op": OP, "impl": impl, "case": case, "dtype": str(dtype).removeprefix("torch."), "pass": "fwd+bwd",
                 "ms": None, "tflops": None, "note": f"refused: {message}", **extra}]
    common = {"op": OP, "impl": impl, "case": case, "dtype": dtype}
    return [
        bench.row(**common, pass_="fwd", timing=fwd, flops=flops_fwd, **extra),
        bench.row(**common, pass_="bwd", timing=bwd, flops=2.5 * flops_fwd, **extra),
        bench.row(**common, pass_="fwd+bwd", timing=both, flops=3.5 * flops_fwd, peak_mem_gb=memory, **extra),
    ]


def padded_cases(bench: Bench, dtype: torch.dtype, seqlens: tuple[int, ...] | None = None,
                 variants: tuple[tuple[bool, float], ...] | None = None) -> list[dict]:
    """Every (L, mask?, dropout) case, or the given `seqlens` and `variants` ((has_mask, dropout_p) pairs) only."""
    tokens, heads, head_dim = (64, 2, 32) if bench.toy else (16384, 12, 64)
    rows = []
    for seqlen in seqlens or ((16, 32) if bench.toy else (128, 512, 1024)):
        batch = tokens // seqlen
        for has_mask in (False, True):
            for dropout_p in (0.0, DROPOUT):
                if variants and (has_mask, dropout_p) not in variants:
                    continue
                variant = " ".join(word for word, on in (("mask", has_mask), ("dropout", dropout_p > 0)) if on)
                case = f"L={seqlen} {variant}".strip()
                input_sets = []
                for _ in range(bench.rotations):
                    q, k, v = _hf_layout(batch, seqlen, heads, head_dim, bench.device, dtype)
                    mask = None
                    if has_mask:
                        lengths = torch.randint(seqlen // 2, seqlen + 1, (batch, 1), device=bench.device)
                        mask = (torch.arange(seqlen, device=bench.device) < lengths).long()
                    input_sets.append((q, k, v, mask, dropout_p))
                flops = 4 * batch * heads * seqlen**2 * head_dim
                for impl, fn in impls(has_mask).items():
                    rows += _time_passes(bench, impl, fn, input_sets, case, dtype, flops, B=batch, L=seqlen)
                qkv_sets = [(_packed_qkv((batch, seqlen), heads, head_dim, bench.device, dtype), mask, dropout_p)
                            for *_, mask, dropout_p in input_sets]
                rows += _time_passes(bench, "electra_triton-qkvpacked", attention_qkvpacked, qkv_sets, case, dtype,
                                     flops, B=batch, L=seqlen)
    return rows


def _packed_qkv(leading: tuple[int, ...], heads, head_dim, device, dtype) -> torch.Tensor:
    """A (..., 3, H, D) leaf, as a fused QKV projection's output viewed per head."""
    return torch.randn(*leading, 3, heads, head_dim, device=device, dtype=dtype).requires_grad_()


def varlen_case(bench: Bench, dtype: torch.dtype) -> list[dict]:
    heads, head_dim = (2, 32) if bench.toy else (12, 64)
    low, high, tokens = (8, 32, 64) if bench.toy else (32, 512, 16384)
    generator = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    batch, seqlen = len(lengths), high
    flops = 4 * heads * head_dim * sum(n * n for n in lengths)
    case = f"varlen {low}-{high} ({sum(lengths)} tokens, {sum(lengths) / (batch * seqlen):.0%} real)"
    mask = (torch.arange(seqlen, device=bench.device) < torch.tensor(lengths, device=bench.device)[:, None]).long()
    cu_seqlens = torch.tensor([0] + lengths, device=bench.device).cumsum(0).to(torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()

    rows = []
    for dropout_p in (0.0, DROPOUT):
        case_p = case + (" dropout" if dropout_p else "")
        padded_sets, packed_sets, qkv_sets = [], [], []
        for _ in range(bench.rotations):
            q, k, v = _hf_layout(batch, seqlen, heads, head_dim, bench.device, dtype)
            padded_sets.append((q, k, v, mask, dropout_p))
            packed = [t.detach().transpose(1, 2).reshape(batch * seqlen, heads, head_dim)[indices].requires_grad_()
                      for t in (q, k, v)]  # (total, H, D)
            packed_sets.append((*packed, cu_seqlens, max(lengths), dropout_p))
            qkv_sets.append((_packed_qkv((len(indices),), heads, head_dim, bench.device, dtype), cu_seqlens,
                             max(lengths), dropout_p))
        rows += _time_passes(bench, "electra_triton-varlen", attention_varlen, packed_sets, case_p, dtype, flops,
                             B=batch, L=seqlen)
        rows += _time_passes(bench, "electra_triton-varlen-qkvpacked", attention_varlen_qkvpacked, qkv_sets, case_p,
                             dtype, flops, B=batch, L=seqlen)
        for impl, fn in impls(True).items():
            rows += _time_passes(bench, impl, fn, padded_sets, case_p, dtype, flops, B=batch, L=seqlen)
    return rows


def run(bench: Bench) -> list[dict]:
    rows = []
    for dtype in bench.dtypes:
        rows += padded_cases(bench, dtype)
        rows += varlen_case(bench, dtype)
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


COLUMNS = ("impl", "case", "dtype", "pass", "ms", "tflops", "fraction_of_ceiling", "peak_mem_gb", "note")

if __name__ == "__main__":
    print_standalone(run, COLUMNS)
