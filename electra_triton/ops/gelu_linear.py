"""gelu_linear: gelu(x @ weight^T + bias) in one GEMM with a fused epilogue (kernels/gelu_linear.py), its reference and
checks."""

import torch
import torch.nn.functional as F

from ..kernels import gelu_linear as kernel
from ._checks import check_float, check_like, check_shape
from ._dispatch import use_kernel


def gelu_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none",
) -> torch.Tensor:
    """Plain PyTorch gelu_linear (the CPU fallback, and what the kernel is tested against)."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


@torch.library.custom_op("electra_triton::gelu_linear_forward", mutates_args=())
def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int, save_z: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, z = kernel.gelu_linear_forward(x, weight, bias, activation, save_z)
    return y, z if z is not None else x.new_empty(0)


@_forward.register_fake
def _(x, weight, bias, activation, save_z):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_z else (0,))


@torch.library.custom_op("electra_triton::gelu_linear_backward", mutates_args=())
def _backward(
    grad_y: torch.Tensor, z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, activation: int,
    needs_dx: bool, needs_dw: bool, grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = kernel.gelu_linear_backward(grad_y, z, x, weight, has_bias, activation, needs_dx, needs_dw,
                                             grad_residual)
    empty = x.new_empty(0)
    return (dx if dx is not None else empty, dw if dw is not None else empty.clone(),
            db if db is not None else empty.clone())


@_backward.register_fake
def _(grad_y, z, x, weight, has_bias, activation, needs_dx, needs_dw, grad_residual=None):
    return (x.new_empty(x.shape if needs_dx else (0,)), weight.new_empty(weight.shape if needs_dw else (0,)),
            weight.new_empty((weight.shape[0],) if has_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias = bias is not None
    ctx.activation = activation
    ctx.set_materialize_grads(False)  # z (saved for backward) never gets a gradient: no (T, N) zero-fill for it


def _autograd_backward(ctx, grad_y, grad_z):
    if grad_y is None:
        return None, None, None, None, None
    x, weight, z = ctx.saved_tensors
    needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw, db = _backward(grad_y, z, x, weight, ctx.has_bias, ctx.activation, needs_dx, needs_dw)
    return dx if needs_dx else None, dw if needs_dw else None, db if ctx.has_bias else None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


class _GeluLinearWithResidual(torch.autograd.Function):
    """gelu_linear that also returns its input x as the residual stream; x's two gradients (through the GEMM and
    through the residual) meet in the dX GEMM's epilogue (kernel.gelu_linear_backward's grad_residual)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int):
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        y, z = _forward(x2, weight, bias, activation, True)
        ctx.save_for_backward(x2, weight, z)
        ctx.has_bias, ctx.activation, ctx.x_shape = bias is not None, activation, x.shape
        ctx.set_materialize_grads(False)
        return y.view(*x.shape[:-1], weight.shape[0]), x

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor | None, grad_residual: torch.Tensor | None):
        x2, weight, z = ctx.saved_tensors
        if grad_y is None:
            return grad_residual, None, None, None
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        residual = None if grad_residual is None else grad_residual.reshape(x2.shape)
        dx, dw, db = _backward(grad_y.reshape(z.shape), z, x2, weight, ctx.has_bias, ctx.activation, needs_dx,
                               needs_dw, residual)
        return (dx.view(ctx.x_shape) if needs_dx else None, dw if needs_dw else None,
                db if ctx.has_bias else None, None)


def gelu_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none", *,
    return_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`F.gelu(F.linear(x, weight, bias), approximate=approximate)` as one GEMM with bias and GELU in its epilogue.

    x (..., K) of any leading shape and strides; weight (N, K); bias (N,) or None; all of one float dtype (fp32, fp16,
    bf16) and device. approximate: "none" (exact erf GELU, ELECTRA's "gelu") or "tanh". Returns (..., N) in x's dtype.
    Accumulates in fp32; fp32 inputs multiply with 3xTF32 (about fp32 accuracy). The backward keeps the pre-activation
    (same memory as eager PyTorch) and runs one fused gelu'-and-bias-gradient pass plus the two GEMMs.

    return_residual: return (output, x), x (a view of itself) for the block's residual add; x's gradient from that
    add is folded into the backward's dX GEMM instead of a separate add (as `ops.linear`).
    """
    x = check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-dim tensor")
    weight = check_float("weight", weight)
    check_like("weight", weight, "x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, K={x.shape[-1]}) as x's last dim, got {tuple(weight.shape)}")
    if bias is not None:
        bias = check_float("bias", bias)
        check_like("bias", bias, "x", x)
        check_shape("bias", bias, (weight.shape[0],))
    if approximate not in kernel.ACTIVATIONS:
        raise ValueError(f"approximate must be one of {sorted(kernel.ACTIVATIONS)}, got {approximate!r}")

    if not use_kernel("gelu_linear", x.device):
        out = gelu_linear_reference(x, weight, bias, approximate)
        return (out, x) if return_residual else out

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if return_residual and needs_grad:
        return _GeluLinearWithResidual.apply(x, weight, bias, kernel.ACTIVATIONS[approximate])
    x2 = x.reshape(-1, x.shape[-1])  # (M, K), a view whenever the leading dims allow one
    y, _ = _forward(x2, weight, bias, kernel.ACTIVATIONS[approximate], needs_grad)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return (y, x) if return_residual else y
