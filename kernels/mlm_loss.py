"""Fused generator head: vocabulary projection, then one pass per row for cross-entropy, gradient, Gumbel-max sample
and argmax. Serves ops.generator_head (ELECTRA's pre-training generator) and ops.mlm_loss (ElectraForMaskedLM).

For hidden (R, E) (the masked rows only), weight (V, E), bias (V,) and labels (R,):

1. logits = hidden @ weight.T + bias: ONE cuBLAS GEMM (fp32 accumulation, stored in the input dtype, bf16 under
   autocast), as nn.Linear computes it.
2. `_generator_head_kernel`, one program per row, tiles over V:
   - pass 1 reads the row once: online max / sum-exp in fp32 (stable log-sum-exp), the running argmax of the logits
     (MLM accuracy) and, with SAMPLE, the running argmax of logits / T + Gumbel noise (the sample). The noise is
     Philox keyed by (seed, row, column / 4, offset), with the seed drawn from torch's generator, so
     `torch.manual_seed` reproduces it. The sample is drawn here, before pass 2 overwrites the logits.
   - the row's loss lse - logit[label];
   - with WRITE_GRAD, pass 2 overwrites the logits IN PLACE with softmax - one_hot(label) (rows whose label is
     ignore_index get zeros). The 1 / #rows and the upstream gradient are applied on the small side of the
     backward GEMMs instead (d_hidden, and hidden before the d_weight GEMM): no (V, E) pass, and fp16 gradients
     stay clear of underflow whatever a loss scaler does.
3. Backward: d_hidden = dlogits @ weight and d_weight = dlogits.T @ hidden (two GEMMs), d_bias = column sums of
   dlogits; nothing is recomputed.

Memory rule: the logits of all R rows are held at once (from forward to backward) unless they would exceed
LOGITS_BUDGET_BYTES; only then are the rows processed in chunks that fit, and each chunk's two gradient GEMMs and
column sum run right after its kernel (in the forward), so that only one chunk of logits ever lives. ELECTRA-base
(~2,500 masked rows x 30,522 tokens in bf16, ~150 MB) is one chunk.

Labels outside [0, V) other than ignore_index: the row's loss is NaN, its gradient zero, and the kernel sets a flag
in device memory (read by the op without a host synchronisation, see electra_triton/ops/generator_head.py).

Supports fp32, fp16, bf16 (fp32 softmax statistics always), any R, E, V (V need not be a multiple of the block),
labels of any integer dtype. Not supported: label smoothing, class weights, the z-loss.
"""

import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from ._compile import TRITON_POINTER_TYPES, CompileTarget, specialized_target

# The most bytes of logits held at once; more rows than fit are processed in chunks. 1 GiB holds ~17,500 masked rows
# of a 30,522-token vocabulary in bf16 (~8,800 in fp32): a 32 x 512 ELECTRA batch has 2,528 prediction slots.
LOGITS_BUDGET_BYTES = 1 << 30


@triton.jit
def _running_argmax(best_value, best_index, values, first_col):
    """Fold a block's maximum into a running (value, index) with one reduction; ties keep the earlier index, as
    torch.argmax does."""
    block_value, block_index = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    better = block_value > best_value
    return tl.where(better, block_value, best_value), tl.where(better, first_col + block_index, best_index)


# seed and philox_offset change every call: unspecialised, so that one compiled kernel serves them all.
@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _generator_head_kernel(
    logits_ptr, labels_ptr, loss_ptr, argmax_ptr, sample_ptr, invalid_ptr,
    stride_row, n_cols, first_row, ignore_index, inv_temperature, seed, philox_offset,
    SAMPLE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_start = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < n_cols)

    m = float("-inf")  # running max of the logits
    top_index = 0  # where it is
    d = 0.0  # running sum of exp(logit - m)
    top_noisy = float("-inf")
    sample_index = 0
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_start + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new, top_index = _running_argmax(m, top_index, x, v0)
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if SAMPLE:
            # One Philox call gives 4 words: column v0 + 4i + k takes word k of counter v0 / 4 + i.
            counter = (v0 // 4 + tl.arange(0, BLOCK_V // 4)).to(tl.uint32)
            zero = counter * 0
            noise_row = (first_row + row).to(tl.uint32)  # the row in the whole call: chunking keeps the noise
            r0, r1, r2, r3 = tl.philox(seed, counter, zero + noise_row, zero + philox_offset, zero)
            uniform = uint_to_uniform_float(tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_V,)))
            # argmax(x / T + Gumbel) in base 2, which lowers to the hardware lg2: dividing by ln 2 keeps the argmax,
            # and -ln(-ln u) = -ln 2 * (log2(-log2 u) + log2(ln 2)), whose constant term does not move it either.
            noisy = x * (inv_temperature * 1.4426950408889634) - tl.log2(-tl.log2(uniform))
            top_noisy, sample_index = _running_argmax(top_noisy, sample_index, noisy, v0)
    lse = m + tl.log(d)
    label_logit = tl.load(row_start + label, mask=in_range & ~ignored, other=0.0).to(tl.float32)
    loss = tl.where(ignored, 0.0, tl.where(in_range, lse - label_logit, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(argmax_ptr + row, top_index.to(tl.int64))
    if SAMPLE:
        tl.store(sample_ptr + row, sample_index.to(tl.int64))
    tl.store(invalid_ptr, 1, mask=~ignored & ~in_range)

    if WRITE_GRAD:
        contributes = ~ignored & in_range
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < n_cols
            x = tl.load(row_start + cols, mask=col_ok, other=0.0)
            grad = tl.exp(x.to(tl.float32) - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_start + cols, tl.where(contributes, grad, 0.0).to(x.dtype), mask=col_ok)


def launch_config(vocab_size: int) -> dict[str, int]:
    """One row per program; 8K-element vocabulary blocks (16 values per thread at 16 warps) keep registers low while
    each program streams its row with wide loads. ELECTRA's 30,522-token vocabulary takes 4 blocks a pass."""
    block_v = max(16, min(8192, triton.next_power_of_2(vocab_size)))
    return {"BLOCK_V": block_v, "num_warps": 16 if block_v >= 4096 else 4, "num_stages": 2}


def rows_per_chunk(n_rows: int, vocab_size: int, element_size: int) -> int:
    """All rows when their logits fit LOGITS_BUDGET_BYTES, else as many as fit (at least one)."""
    return max(1, min(n_rows, LOGITS_BUDGET_BYTES // (vocab_size * element_size)))


def head_rows(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float, seed: int, philox_offset: int,
    sample: bool, write_grad: bool, invalid: torch.Tensor, first_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel over logits (R, V) with contiguous rows and labels (R,); `first_row` is the index of row 0 in
    the whole batch (it keys the noise, so that a chunk draws what the unchunked call would).

    Returns fp32 per-row losses (R,), argmax ids (R,) int64 and, with `sample`, Gumbel-max samples (R,) int64 (rows
    are sampled whatever their label). With `write_grad` the logits are overwritten with softmax - one_hot(label).
    `invalid` (int32, 1 element) is set to 1 if a label is neither in [0, V) nor ignore_index.
    """
    n_rows, vocab_size = logits.shape
    losses = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    argmax = torch.empty(n_rows, device=logits.device, dtype=torch.int64)
    samples = torch.empty(n_rows, device=logits.device, dtype=torch.int64) if sample else None
    if n_rows == 0:
        return losses, argmax, samples
    config = launch_config(vocab_size)
    _generator_head_kernel[(n_rows,)](
        logits, labels, losses, argmax, samples if sample else argmax, invalid,
        logits.stride(0), vocab_size, first_row, ignore_index, 1.0 / temperature, seed, philox_offset,
        SAMPLE=sample, WRITE_GRAD=write_grad, BLOCK_V=config["BLOCK_V"], num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return losses, argmax, samples


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def generator_head_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    temperature: float, seed: int, philox_offset: int, sample: bool, compute_grad: bool, invalid: torch.Tensor,
) -> dict[str, torch.Tensor | None]:
    """hidden (R, E), weight (V, E) contiguous, bias (V,) or None, labels (R,).

    Returns per-row fp32 `losses`, `argmax` and `samples` (None without `sample`), and with `compute_grad` either
    `dlogits` (R, V) = softmax - one_hot (the logits buffer, when one chunk holds all rows) or, when chunked, the
    unscaled gradients `grad_hidden` (R, E), `grad_weight` (V, E) and `grad_bias` (V,) (None without bias) of the
    summed row losses. Entries that do not apply are None.
    """
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    step = rows_per_chunk(n_rows, vocab_size, hidden.element_size())
    out: dict[str, torch.Tensor | None] = dict.fromkeys(
        ("losses", "argmax", "samples", "dlogits", "grad_hidden", "grad_weight", "grad_bias"))
    if step >= n_rows:
        logits = _logits(hidden, weight, bias)  # (R, V)
        out["losses"], out["argmax"], out["samples"] = head_rows(
            logits, labels, ignore_index, temperature, seed, philox_offset, sample, compute_grad, invalid)
        out["dlogits"] = logits if compute_grad else None
        return out

    out["losses"] = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    out["argmax"] = torch.empty(n_rows, device=hidden.device, dtype=torch.int64)
    out["samples"] = torch.empty(n_rows, device=hidden.device, dtype=torch.int64) if sample else None
    if compute_grad:
        out["grad_hidden"] = torch.empty_like(hidden)
        out["grad_weight"] = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        if bias is not None:
            out["grad_bias"] = torch.zeros(vocab_size, device=weight.device, dtype=torch.float32)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        chunk = hidden[rows]
        logits = _logits(chunk, weight, bias)
        losses, argmax, samples = head_rows(
            logits, labels[rows], ignore_index, temperature, seed, philox_offset, sample, compute_grad, invalid, start)
        out["losses"][rows], out["argmax"][rows] = losses, argmax
        if sample:
            out["samples"][rows] = samples
        if compute_grad:  # the logits now hold their gradient; fold it in before the next chunk overwrites them
            out["grad_hidden"][rows] = logits @ weight
            out["grad_weight"] += (logits.T @ chunk).float()
            if bias is not None:
                out["grad_bias"] += logits.sum(dim=0, dtype=torch.float32)
    return out


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """The head kernel at every generator vocabulary size, each dtype, as the generator head launches it (sampling,
    with and without the gradient) and as mlm_loss does (no sampling, with and without the gradient)."""
    targets = []
    generators = [m for m in models if m["role"] == "generator"]
    for vocab_size in sorted({m["vocab_size"] for m in generators}):
        config = launch_config(vocab_size)
        sizes = sorted({m["embedding_size"] for m in generators if m["vocab_size"] == vocab_size})
        for pointer in TRITON_POINTER_TYPES.values():
            for sample in (True, False):
                for write_grad in (False, True):
                    targets.append(specialized_target(
                        _generator_head_kernel,
                        pointers={"logits_ptr": pointer, "labels_ptr": "*i64", "loss_ptr": "*fp32",
                                  "argmax_ptr": "*i64", "sample_ptr": "*i64", "invalid_ptr": "*i32"},
                        ints={"stride_row": vocab_size, "n_cols": vocab_size, "first_row": 0, "ignore_index": -100,
                              "seed": 3, "philox_offset": 5},
                        scalars={"inv_temperature": "fp32"},
                        constexprs={"SAMPLE": sample, "WRITE_GRAD": write_grad, "BLOCK_V": config["BLOCK_V"]},
                        num_warps=config["num_warps"], num_stages=config["num_stages"], multiplies_matrices=False,
                        label=f"V={vocab_size} E={'/'.join(map(str, sizes))} {pointer[1:]} sample={sample} "
                              f"grad={write_grad}",
                    ))
    return targets
