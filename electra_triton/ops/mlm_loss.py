"""mlm_loss: masked-LM cross-entropy fused with its vocabulary projection (kernels/mlm_loss.py, the generator head's
kernel without sampling), reference, checks."""

import torch
import torch.nn.functional as F

from ..kernels import mlm_loss as kernel
from ._checks import check_vocab_projection
from ._dispatch import use_kernel


def mlm_loss_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int = -100, return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch mlm_loss in fp32 (the CPU fallback, and what the kernel is tested against)."""
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    flat_labels = labels.reshape(-1).long()
    per_token = F.cross_entropy(
        logits.reshape(-1, weight.shape[0]), flat_labels, ignore_index=ignore_index, reduction="none"
    )
    loss = per_token.sum() / (flat_labels != ignore_index).sum().clamp_min(1)
    return (loss, logits.to(hidden.dtype)) if return_logits else loss


@torch.library.custom_op("electra_triton::mlm_loss_forward", mutates_args=())
def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab_size = weight.shape[0]
    active_mask = labels != ignore_index
    bad = active_mask & ((labels < 0) | (labels >= vocab_size))
    n_active, n_bad = torch.stack([active_mask.sum(), bad.sum()]).tolist()  # the one host synchronisation
    if n_bad:
        raise ValueError(f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}")
    active = torch.nonzero_static(active_mask, size=n_active).squeeze(1)  # (R,)
    hidden_active = hidden[active]
    flag = torch.zeros(1, device=hidden.device, dtype=torch.int32)  # no bad label left to flag
    out = kernel.generator_head_forward(
        hidden_active, weight, bias, labels[active], ignore_index, 1.0, 0, 0, False, compute_grad, flag)
    scale = 1.0 / max(n_active, 1)
    loss = out["losses"].sum() * scale
    if not compute_grad:  # three distinct tensors: custom op outputs may not alias each other
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    dlogits = out["dlogits"]
    if dlogits is not None:  # one chunk: the two gradient GEMMs now (this op's rows are known only here)
        grad_active = dlogits @ weight
        grad_weight = dlogits.T @ (hidden_active.float() * scale).to(hidden.dtype)  # the scale on the small side
        grad_bias = dlogits.sum(dim=0, dtype=torch.float32) if bias is not None else None
    else:
        grad_active, grad_bias = out["grad_hidden"], out["grad_bias"]
        grad_weight = (out["grad_weight"] * scale).to(weight.dtype)
    grad_hidden = torch.zeros_like(hidden).index_copy_(0, active, (grad_active.float() * scale).to(hidden.dtype))
    grad_bias = (grad_bias * scale).to(weight.dtype) if grad_bias is not None else hidden.new_empty(0)
    return loss, grad_hidden, grad_weight, grad_bias


@_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, compute_grad):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:  # three distinct tensors: custom op outputs may not alias each other
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.has_bias = inputs[2] is not None
    ctx.set_materialize_grads(False)  # only the loss carries a gradient: no zeros for the other outputs


def _autograd_backward(ctx, grad_loss, *_):
    # The forward already computed the gradients of the loss; the chain rule only scales them.
    if grad_loss is None:
        return None, None, None, None, None, None
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    return (
        grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype),
        grad_bias * grad_loss.to(grad_bias.dtype) if ctx.has_bias else None, None, None, None,
    )


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def mlm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int = -100, return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM loss of a vocabulary projection, fused: only the labelled rows' logits are ever computed.

    Equals `F.cross_entropy(F.linear(hidden, weight, bias).view(-1, V), labels.view(-1), ignore_index=ignore_index)`,
    as ElectraForMaskedLM computes it through `generator_lm_head`, except that a batch with no label other than
    `ignore_index` gives loss 0 and zero gradients instead of NaN. The rows whose label is not `ignore_index` are
    gathered (one host synchronisation: their number; bad labels raise ValueError there at no extra cost) and run
    through the generator head's kernel without sampling, under its memory rule (one logits GEMM unless the logits
    exceed kernels/mlm_loss.LOGITS_BUDGET_BYTES). The gradients of hidden, weight and bias are computed during the
    forward when any of them requires grad (the two GEMMs over the logits' gradient), and backward only scales them.

    hidden (..., E) float; weight (V, E) and bias (V,) or None of hidden's dtype; labels of shape hidden.shape[:-1],
    integer, each in [0, V) or equal to `ignore_index`. Returns the fp32 scalar loss. With `return_logits=True` also
    the full logits (..., V) in hidden's dtype, computed by a plain F.linear beside the fused loss (this costs the
    memory the fused loss avoids: use it for evaluation, not for training steps).
    """
    hidden, labels = check_vocab_projection(hidden, weight, bias, labels, ignore_index, True)
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")

    if not use_kernel("mlm_loss", hidden.device):
        return mlm_loss_reference(hidden, weight, bias, labels, ignore_index, return_logits)

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss = _forward(
        hidden.reshape(-1, hidden.shape[-1]), weight.contiguous(), bias, labels.reshape(-1), ignore_index, needs_grad
    )[0]
    if return_logits:
        return loss, F.linear(hidden, weight, bias)
    return loss
