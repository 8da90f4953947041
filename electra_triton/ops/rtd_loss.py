"""rtd_loss: ELECTRA's replaced-token-detection loss, fused (kernels/rtd_loss.py), with its reference and checks."""

import torch
import torch.nn.functional as F

from ..kernels import rtd_loss as kernel
from ._checks import check_float, check_like, check_shape, check_tensor
from ._dispatch import use_kernel


def rtd_loss_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None, return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch rtd_loss in fp32 (the CPU fallback, and what the kernel is tested against)."""
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float()).squeeze(-1)
    per_token = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    active = torch.ones_like(per_token, dtype=torch.bool) if attention_mask is None else attention_mask == 1
    loss = torch.where(active, per_token, 0.0).sum() / active.sum().clamp_min(1)
    return (loss, logits.to(hidden.dtype)) if return_logits else loss


@torch.library.custom_op("electra_triton::rtd_loss_forward", mutates_args=())
def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    mask: torch.Tensor | None, write_logits: bool, logits_requested: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.rtd_loss_forward(hidden, weight, bias, labels, mask, write_logits)


@_forward.register_fake
def _(hidden, weight, bias, labels, mask, write_logits, logits_requested):
    scalar = hidden.new_empty((), dtype=torch.float32)
    return scalar, scalar.clone(), hidden.new_empty(hidden.shape[:2] if write_logits else (0,), dtype=torch.float32)


@torch.library.custom_op("electra_triton::rtd_loss_backward", mutates_args=())
def _backward(
    grad_loss: torch.Tensor, grad_logits: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor,
    labels: torch.Tensor, mask: torch.Tensor | None, logits: torch.Tensor, count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.rtd_loss_backward(grad_loss, grad_logits, hidden, weight, labels, mask, logits, count)


@_backward.register_fake
def _(grad_loss, grad_logits, hidden, weight, labels, mask, logits, count):
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    return d_hidden, torch.empty_like(weight), weight.new_empty(1)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, mask, _, logits_requested = inputs
    _, count, logits = output
    ctx.save_for_backward(hidden, weight, labels, mask, logits, count)
    ctx.has_bias = bias is not None
    ctx.logits_requested = logits_requested


def _autograd_backward(ctx, grad_loss, grad_count, grad_logits):
    hidden, weight, labels, mask, logits, count = ctx.saved_tensors
    d_hidden, d_weight, d_bias = _backward(
        grad_loss.float().contiguous(), grad_logits.contiguous() if ctx.logits_requested else None,
        hidden, weight, labels, mask, logits, count,
    )
    return d_hidden, d_weight, d_bias if ctx.has_bias else None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _as_batch_of_sequences(tensor: torch.Tensor, n_leading: int) -> torch.Tensor:
    """View (..., L[, H]) as (B, L[, H]) with B the product of the other leading dims (a copy only if unviewable)."""
    shape = tensor.shape
    if n_leading == 1:
        return tensor.unsqueeze(0)
    return tensor.reshape(-1, *shape[n_leading - 1:])


def rtd_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None, return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Replaced-token-detection loss of ELECTRA's discriminator head, fused.

    Equals `BCEWithLogitsLoss()(logits[active], labels[active].float())` with
    `logits = (hidden @ weight.T + bias).squeeze(-1)` and `active = attention_mask == 1` (every token when the mask
    is None), as ElectraForPreTraining computes it from `discriminator_predictions.dense_prediction`; except that a
    batch with no active token gives loss 0 and zero gradients instead of NaN.

    hidden (..., H) float; weight (1, H) and bias (1,) or None of hidden's dtype; labels and attention_mask of shape
    hidden.shape[:-1], any integer, bool or float dtype. Returns the fp32 scalar loss, and with `return_logits=True`
    also the per-token logits (hidden.shape[:-1], hidden's dtype).
    """
    hidden = check_float("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (..., L, H) with at least 2 dims, got {tuple(hidden.shape)}")
    hidden_size = hidden.shape[-1]
    check_like("weight", check_float("weight", weight), "hidden", hidden)
    check_shape("weight", weight, (1, hidden_size))
    if bias is not None:
        check_like("bias", check_float("bias", bias), "hidden", hidden)
        check_shape("bias", bias, (1,))
    labels = check_tensor("labels", labels)
    check_shape("labels", labels, hidden.shape[:-1])
    check_like("labels", labels, "hidden", hidden, dtype=False)
    if labels.is_complex():
        raise TypeError(f"labels must be integer, bool or float, got {labels.dtype}")
    if attention_mask is not None:
        attention_mask = check_tensor("attention_mask", attention_mask)
        check_shape("attention_mask", attention_mask, hidden.shape[:-1])
        check_like("attention_mask", attention_mask, "hidden", hidden, dtype=False)
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask must be integer, bool or float, got {attention_mask.dtype}")
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")

    if not use_kernel("rtd_loss", hidden.device):
        return rtd_loss_reference(hidden, weight, bias, labels, attention_mask, return_logits)

    n_leading = hidden.dim() - 1
    hidden3 = _as_batch_of_sequences(hidden, n_leading)  # (B, L, H)
    labels2 = _as_batch_of_sequences(labels, n_leading)  # (B, L)
    mask2 = None if attention_mask is None else _as_batch_of_sequences(attention_mask, n_leading)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, _, logits = _forward(hidden3, weight, bias, labels2, mask2, needs_grad or return_logits, return_logits)
    if return_logits:
        return loss, logits.reshape(hidden.shape[:-1]).to(hidden.dtype)
    return loss
