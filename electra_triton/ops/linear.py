"""pack_parameters and linear: the plain GEMMs of a fused encoder layer, with as few launches around them as possible.

Under autocast every nn.Linear casts its fp32 weight and bias to the autocast dtype in its own forward (two kernels)
and casts their gradients back in the backward (two more). `pack_parameters` casts any set of parameters in one
multi-tensor launch each way, concatenating groups on the way (q, k and v into one (3H, H) weight: no torch.cat).

`linear` is F.linear that can also hand back its input as the residual stream (`return_residual=True`): the block's
residual add then reads that alias, whose gradient reaches `linear`'s backward, which folds it into the dX GEMM
(addmm's beta = 1 epilogue) instead of autograd adding two (tokens, hidden) gradients with one more full pass.

Both are plain PyTorch (cuBLAS GEMMs, the foreach copy kernel): they run on every device.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._checks import check_float, check_like, check_shape


class _PackParameters(torch.autograd.Function):
    """Forward: each group's tensors concatenated along dim 0 in `dtype`. Backward: each gradient split and cast
    back to its parameter's dtype. One `_foreach_copy_` (multi-tensor, converting) launch each way."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, group_sizes: tuple[int, ...], *tensors: torch.Tensor):
        # One allocation: every packed group is a view of it, and each tensor's destination a view of its group.
        flat = torch.empty(sum(t.numel() for t in tensors), device=tensors[0].device, dtype=dtype)
        packed, destinations, start, offset = [], [], 0, 0
        for size in group_sizes:
            group = tensors[start:start + size]
            start += size
            rows = sum(t.shape[0] for t in group)
            numel = sum(t.numel() for t in group)
            out = flat.narrow(0, offset, numel).view(rows, *group[0].shape[1:])
            offset += numel
            row = 0
            for t in group:
                destinations.append(out.narrow(0, row, t.shape[0]))
                row += t.shape[0]
            packed.append(out)
        torch._foreach_copy_(destinations, list(tensors))
        ctx.group_sizes = group_sizes
        ctx.metas = [(t.shape, t.dtype) for t in tensors]
        return tuple(packed)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        sources, start = [], 0
        for size, grad in zip(ctx.group_sizes, grads, strict=True):
            grad = grad.contiguous()
            row = 0
            for shape, _ in ctx.metas[start:start + size]:
                sources.append(grad.narrow(0, row, shape[0]))
                row += shape[0]
            start += size
        # The parameters' gradients, as views of one allocation per dtype (parameters of one dtype, in practice).
        results = [None] * len(ctx.metas)
        for dtype in {dtype for _, dtype in ctx.metas}:
            chosen = [i for i, (_, d) in enumerate(ctx.metas) if d == dtype]
            flat = torch.empty(sum(ctx.metas[i][0].numel() for i in chosen), device=grads[0].device, dtype=dtype)
            offset = 0
            for i in chosen:
                numel = ctx.metas[i][0].numel()
                results[i] = flat.narrow(0, offset, numel).view(ctx.metas[i][0])
                offset += numel
        torch._foreach_copy_(results, sources)
        return None, None, *results


def pack_parameters(groups: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One tensor per group: its tensors concatenated along dim 0 (the trailing dims must agree) and cast to `dtype`.

    Differentiable: each parameter gets its slice of the packed gradient, in its own dtype. All tensors on one device.
    One multi-tensor copy launch forward and one backward on CUDA, whatever the number of tensors (up to the
    foreach kernel's per-launch limits), instead of a cast (and a torch.cat) per tensor. A group of one tensor
    already in `dtype` comes back as that tensor (no copy).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not groups or any(len(group) == 0 for group in groups):
        raise ValueError("groups must be a non-empty sequence of non-empty groups of tensors")
    tensors = [check_float(f"groups[{i}][{j}]", t) for i, group in enumerate(groups) for j, t in enumerate(group)]
    for i, group in enumerate(groups):
        for j, t in enumerate(group):
            check_like(f"groups[{i}][{j}]", t, "groups[0][0]", tensors[0], dtype=False)
            if t.dim() < 1 or t.shape[1:] != group[0].shape[1:]:
                raise ValueError(f"groups[{i}][{j}] has shape {tuple(t.shape)}: a group's tensors must agree on every "
                                 f"dim but the first, like groups[{i}][0] {tuple(group[0].shape)}")
    # A lone tensor already in `dtype` is used as is; only the others are copied.
    copied = [i for i, group in enumerate(groups) if len(group) > 1 or group[0].dtype != dtype]
    packed = list(group[0] for group in groups)
    if copied:
        results = _PackParameters.apply(dtype, tuple(len(groups[i]) for i in copied),
                                        *(t for i in copied for t in groups[i]))
        for i, result in zip(copied, results, strict=True):
            packed[i] = result
    return tuple(packed)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, return_residual: bool):
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        out = F.linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return (out, x) if return_residual else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_residual: torch.Tensor | None = None):
        x2, weight = ctx.saved_tensors
        dy = grad_out.reshape(-1, weight.shape[0])  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if grad_residual is None:
                dx = dy @ weight
            else:  # the residual stream's gradient enters the GEMM's epilogue: no separate add
                dx = torch.addmm(grad_residual.reshape(-1, weight.shape[1]), dy, weight)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = dy.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, return_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """F.linear(x, weight, bias); with `return_residual`, (that, residual) where residual is x itself (a view) for the
    block's residual add: its gradient is folded into the backward's dX GEMM (module docstring).

    x (..., K), weight (N, K), bias (N,) or None, all of one float dtype and device (cast them first, e.g. with
    `pack_parameters`: this op does not autocast).
    """
    x = check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-dim tensor")
    check_like("weight", check_float("weight", weight), "x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, K={x.shape[-1]}) as x's last dim, got {tuple(weight.shape)}")
    if bias is not None:
        check_like("bias", check_float("bias", bias), "x", x)
        check_shape("bias", bias, (weight.shape[0],))
    if not torch.is_autocast_enabled(x.device.type):
        return _Linear.apply(x, weight, bias, return_residual)
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are the caller's choice (docstring)
        return _Linear.apply(x, weight, bias, return_residual)
