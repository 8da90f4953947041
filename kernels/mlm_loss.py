"""Fused masked-LM loss: linear projection over the vocabulary + softmax cross-entropy, in chunks of rows.

For hidden (N, E), weight (V, E), bias (V,) and labels (N,), computes

    loss = mean over rows with label != ignore_index of  logsumexp(hidden[r] @ weight.T + bias) - logit[r, label[r]]

without ever holding the (N, V) logits: only the active rows (the ~15 % masked positions of ELECTRA's generator) are
gathered, and they are processed in chunks whose logits (chunk, V) live in the input dtype, as Liger-Kernel's
fused_linear_cross_entropy does. Per chunk:

1. logits = hidden_chunk @ weight.T + bias (cuBLAS, fp32 accumulation, stored in the input dtype, as nn.Linear);
2. `_cross_entropy_kernel`, one program per row: an online max/sum-exp pass over the vocabulary in fp32 gives the
   log-sum-exp and the row's loss; a second pass overwrites the logits in place with their gradient
   (softmax - one_hot(label)) / #active, so no second (chunk, V) buffer exists;
3. grad_hidden_chunk = grad_logits @ weight, grad_weight += grad_logits.T @ hidden_chunk (fp32 accumulator),
   grad_bias += column sums of grad_logits (fp32).

The gradients are thus complete after the forward; backward only scales them by the incoming gradient of the loss.
Peak extra memory is one chunk of logits plus an fp32 (V, E) accumulator for grad_weight.

Supports fp32, fp16, bf16 (fp32 softmax statistics always), any N, E, V (V need not be a multiple of the block),
labels of any integer dtype. Not supported: label smoothing, per-class weights, reductions other than the mean,
the z-loss. Targets outside [0, V) are rejected by the op before any kernel runs.
"""

import torch
import triton
import triton.language as tl

from ._compile import TRITON_POINTER_TYPES, CompileTarget, specialized_target


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, targets_ptr, loss_ptr, stride_row, n_cols, grad_scale,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row).to(tl.int64)

    # Online log-sum-exp over vocabulary blocks: running max m and running sum d of exp(x - m).
    m = float("-inf")
    d = 0.0
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_start + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    target_logit = tl.load(row_start + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - target_logit)

    if WRITE_GRAD:
        # d loss / d logit = (softmax - one_hot) * grad_scale, written over the logits this program just read.
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < n_cols
            x = tl.load(row_start + cols, mask=col_ok, other=0.0)
            grad = tl.exp(x.to(tl.float32) - lse)
            grad = tl.where(cols == target, grad - 1.0, grad) * grad_scale
            tl.store(row_start + cols, grad.to(x.dtype), mask=col_ok)


def launch_config(vocab_size: int) -> dict[str, int]:
    """One row per program; 8K-element vocabulary blocks (16 fp32 values per thread at 16 warps) keep registers low
    while each program streams its row with wide loads. ELECTRA's 30522-token vocabulary takes 4 blocks a pass."""
    block_v = min(8192, triton.next_power_of_2(vocab_size))
    return {"BLOCK_V": block_v, "num_warps": 16 if block_v >= 4096 else 4, "num_stages": 2}


def chunk_rows(n_rows: int, vocab_size: int, hidden_size: int) -> int:
    """Rows per chunk: the chunk's logits take about as much memory as the active hidden rows (Liger's rule), and at
    least 64 rows so each chunk's matmuls still fill the GPU."""
    chunks = triton.cdiv(vocab_size, hidden_size)
    return max(64, triton.next_power_of_2(triton.cdiv(max(n_rows, 1), chunks)))


def cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: float, write_grad: bool
) -> torch.Tensor:
    """logits (R, V) contiguous rows, targets (R,) in [0, V) -> per-row fp32 losses (R,).

    With `write_grad`, the logits are overwritten with grad_scale * (softmax - one_hot(target)).
    """
    n_rows, vocab_size = logits.shape
    losses = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    if n_rows == 0:
        return losses
    config = launch_config(vocab_size)
    _cross_entropy_kernel[(n_rows,)](
        logits, targets, losses, logits.stride(0), vocab_size, grad_scale,
        WRITE_GRAD=write_grad, BLOCK_V=config["BLOCK_V"], num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return losses


def mlm_loss_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, n_total: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """hidden (R, E) active rows, weight (V, E), bias (V,) or None, targets (R,) in [0, V).

    Returns (loss sum over the rows / n_total as an fp32 scalar, grad_hidden (R, E), grad_weight (V, E) fp32,
    grad_bias (V,) fp32), the gradients of that loss (None unless `compute_grad`).
    """
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    step = chunk_rows(n_rows, vocab_size, hidden_size)
    grad_scale = 1.0 / max(n_total, 1)
    grad_hidden = torch.empty_like(hidden) if compute_grad else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if compute_grad else None
    grad_bias = (
        torch.zeros(vocab_size, device=weight.device, dtype=torch.float32) if compute_grad and bias is not None
        else None
    )
    losses = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        chunk = hidden[rows]  # (C, E)
        logits = chunk @ weight.T if bias is None else torch.addmm(bias, chunk, weight.T)  # (C, V)
        losses[rows] = cross_entropy_rows(logits, targets[rows], grad_scale, compute_grad)
        if compute_grad:  # the logits now hold their gradient
            grad_hidden[rows] = logits @ weight
            grad_weight += (logits.T @ chunk).float()
            if grad_bias is not None:
                grad_bias += logits.sum(dim=0, dtype=torch.float32)
    return losses.sum() * grad_scale, grad_hidden, grad_weight, grad_bias


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """The cross-entropy kernel at every generator vocabulary size, each dtype, with and without the gradient."""
    targets = []
    for vocab_size in sorted({m["vocab_size"] for m in models if m["role"] == "generator"}):
        config = launch_config(vocab_size)
        sizes = sorted({m["embedding_size"] for m in models if m["role"] == "generator"})
        for pointer in TRITON_POINTER_TYPES.values():
            for write_grad in (False, True):
                targets.append(specialized_target(
                    _cross_entropy_kernel,
                    pointers={"logits_ptr": pointer, "targets_ptr": "*i64", "loss_ptr": "*fp32"},
                    ints={"stride_row": vocab_size, "n_cols": vocab_size}, scalars={"grad_scale": "fp32"},
                    constexprs={"WRITE_GRAD": write_grad, "BLOCK_V": config["BLOCK_V"]},
                    num_warps=config["num_warps"], num_stages=config["num_stages"], multiplies_matrices=False,
                    label=f"V={vocab_size} E={'/'.join(map(str, sizes))} {pointer[1:]} grad={write_grad}",
                ))
    return targets
