"""dropout_add_layer_norm: LayerNorm(dropout(x + x_bias) + residual) in one pass (kernels/layer_norm.py), its
reference, a debug entry point returning the dropout mask, and checks."""

import torch
import torch.nn.functional as F

from ..kernels import layer_norm as kernel
from ._checks import check_dropout_p, check_eps, check_float, check_like, check_norm_param, check_shape
from ._dispatch import philox_rng_state, use_kernel


def dropout_add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, dropout_p: float = 0.0, keep_mask: torch.Tensor | None = None, *, x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: F.layer_norm(F.dropout(x + x_bias, dropout_p) + residual, ...). With `keep_mask` (bool, x's
    shape), that mask replaces F.dropout's random one (kept elements scaled by 1 / (1 - dropout_p)), to compare with
    the kernel.

    x + x_bias is rounded to x's dtype, as a linear layer with its bias returns it. Mixed dtypes (fp16/bf16 x and
    residual, fp32 weight/bias) normalise in fp32 and return x's dtype, as the op does.
    """
    if x_bias is not None:
        x = (x + x_bias).to(x.dtype)
    if keep_mask is not None:
        x = torch.where(keep_mask, x / (1.0 - dropout_p), 0.0).to(x.dtype)
    elif dropout_p > 0:
        x = F.dropout(x, dropout_p)
    h = x if residual is None else x + residual
    params = [t for t in (weight, bias) if t is not None]
    if all(t.dtype == h.dtype for t in params):
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    weight, bias = (None if t is None else t.float() for t in (weight, bias))
    return F.layer_norm(h.float(), h.shape[-1:], weight, bias, eps).to(h.dtype)


@torch.library.custom_op("electra_triton::dropout_add_layer_norm_forward", mutates_args=())
def _forward(
    x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float, dropout_p: float, rng: torch.Tensor, store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, offset = rng.tolist()
    return kernel.dropout_add_layer_norm_forward(x, x_bias, residual, weight, bias, eps, dropout_p, seed, offset,
                                                 store_mask)


@_forward.register_fake
def _(x, x_bias, residual, weight, bias, eps, dropout_p, rng, store_mask):
    stat = x.new_empty(x.shape[0], dtype=torch.float32)
    return x.new_empty(x.shape), stat, stat.clone(), x.new_empty(x.shape if store_mask else (0,), dtype=torch.uint8)


@torch.library.custom_op("electra_triton::dropout_add_layer_norm_backward", mutates_args=())
def _backward(
    grad_y: torch.Tensor, x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None,
    weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float,
    rng: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_x, d_x_bias, d_residual, d_weight, d_bias); an empty tensor for each absent input."""
    seed, offset = rng.tolist()
    grads = kernel.dropout_add_layer_norm_backward(
        grad_y, x, x_bias, residual, weight, None if bias is None else bias.dtype, mean, rstd, dropout_p, seed, offset)
    empty = x.new_empty(0)
    return grads[0], *(t if t is not None else empty.clone() for t in grads[1:])


@_backward.register_fake
def _(grad_y, x, x_bias, residual, weight, bias, mean, rstd, dropout_p, rng):
    return (x.new_empty(x.shape),
            *(x.new_empty(0) if t is None else torch.empty_like(t) for t in (x_bias, residual, weight, bias)))


def _setup_context(ctx, inputs, output):
    x, x_bias, residual, weight, bias, _, dropout_p, rng, _ = inputs
    _, mean, rstd, _ = output
    # Activations in their own (16-bit under autocast) dtype, fp32 statistics; x_bias, weight and bias are parameters
    # (bias only tells the backward its dtype).
    ctx.save_for_backward(x, x_bias, residual, weight, bias, mean, rstd, rng)
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # mean, rstd and the mask get no gradient: no zero-filled buffers for them


def _autograd_backward(ctx, grad_y, grad_mean, grad_rstd, grad_mask):
    x, x_bias, residual, weight, bias, mean, rstd, rng = ctx.saved_tensors
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    grads = _backward(grad_y, x, x_bias, residual, weight, bias, mean, rstd, ctx.dropout_p, rng)
    inputs = (x, x_bias, residual, weight, bias)
    return *(grad if given is not None else None for grad, given in zip(grads, inputs)), None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, dropout_p: float, x_bias: torch.Tensor | None,
) -> float:
    x = check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., N) with N >= 1, got {tuple(x.shape)}")
    n_cols = x.shape[-1]
    if n_cols > kernel.MAX_HIDDEN:
        raise ValueError(f"x's last dim must be at most {kernel.MAX_HIDDEN}, got {n_cols}")
    if residual is not None:
        check_like("residual", check_float("residual", residual), "x", x)
        check_shape("residual", residual, x.shape)
    for name, param in (("x_bias", x_bias), ("weight", weight), ("bias", bias)):
        if param is not None:
            check_norm_param(name, param, "x", x, n_cols)
    check_eps(eps)
    return check_dropout_p(dropout_p)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with unit column stride (a view when possible)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _run(x, residual, weight, bias, eps, dropout_p, x_bias, store_mask):
    y, _, _, mask = _forward(_rows(x), x_bias, None if residual is None else _rows(residual), weight, bias, float(eps),
                             dropout_p, philox_rng_state(dropout_p), store_mask)
    return y.reshape(x.shape), mask.reshape(x.shape).bool() if store_mask else None


def dropout_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, dropout_p: float = 0.0, *, x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.layer_norm(F.dropout(x + x_bias, dropout_p) + residual, (N,), weight, bias, eps)` in one pass over memory.

    x (..., N) of any leading shape; residual of x's shape, or None (then LayerNorm(dropout(x)), e.g. for the
    embeddings); weight and bias (N,) or None (elementwise_affine=False); all on one device. x and residual share a
    float dtype; weight and bias have that dtype or float32 (fp16/bf16 activations with fp32 parameters: the residual
    stream under autocast stays 16-bit, and only 16-bit activations plus fp32 mean/rstd are saved for backward).
    x_bias (N,) or None, x's dtype or float32 like weight and bias: the bias of the linear layer that produced x,
    which then runs without it (`F.linear(h, W)`, a plain GEMM) and needs no column sum of its own in the backward:
    x_bias is added in fp32 before dropout (Megatron's bias-dropout-add), and its gradient, the sum over rows of the
    gradient of x, is reduced in this op's backward pass along with d_weight and d_bias.
    Dropout is applied whenever dropout_p > 0 (the caller decides from its training mode), with a Philox mask drawn
    from torch's generator (reproducible under torch.manual_seed) and regenerated, not stored, for the backward.
    Statistics in fp32; returns x's dtype and shape; x_bias, weight and bias gradients come back in their own dtype.
    """
    dropout_p = _check(x, residual, weight, bias, eps, dropout_p, x_bias)
    if not use_kernel("dropout_add_layer_norm", x.device):
        return dropout_add_layer_norm_reference(x, residual, weight, bias, eps, dropout_p, x_bias=x_bias)
    return _run(x, residual, weight, bias, eps, dropout_p, x_bias, store_mask=False)[0]


def dropout_add_layer_norm_with_mask(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, dropout_p: float = 0.0, *, x_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug entry point: dropout_add_layer_norm's output and the boolean keep-mask (x's shape) it applied, for tests
    against `dropout_add_layer_norm_reference(..., keep_mask=mask, x_bias=x_bias)`. Differentiable like the plain
    op."""
    dropout_p = _check(x, residual, weight, bias, eps, dropout_p, x_bias)
    if not use_kernel("dropout_add_layer_norm", x.device):
        keep = torch.rand(x.shape, device=x.device) >= dropout_p
        return dropout_add_layer_norm_reference(x, residual, weight, bias, eps, dropout_p, keep, x_bias=x_bias), keep
    return _run(x, residual, weight, bias, eps, dropout_p, x_bias, store_mask=True)
