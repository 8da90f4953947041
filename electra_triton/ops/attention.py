"""attention: fused non-causal attention with key-padding mask and dropout (kernels/attention.py), its packed (varlen)
form, the unpad/pad helpers, the PyTorch references, and argument checks.

Head dims other than 32, 64 and 128 are not an error: they run the PyTorch reference (fp32 math, L x L memory), with
one warning per head dim. Everything else the kernel cannot take raises TypeError/ValueError naming the argument.
"""

import math
import warnings

import torch
import torch.nn.functional as F

from ..kernels import attention as kernel
from ._checks import check_dropout_p, check_float, check_like, check_shape, check_tensor
from ._dispatch import philox_rng_state, use_kernel

HEAD_DIMS = kernel.HEAD_DIMS  # what the kernel takes; other head dims run the reference
_warned_head_dims: set[int] = set()


# ---------------------------------------------------------------------------------------------------------------------
# References


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, scale: float | None = None, dropout_mask: torch.Tensor | None = None, upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch attention: softmax(scale * q @ k^T with masked keys at -inf) @ v, rows with no real key -> 0.

    q, k, v (B, H, L, D); attention_mask (B, L), nonzero = real token. Computes in fp32 (float64 for float64 inputs)
    unless `upcast=False`, which computes in the inputs' dtype (PyTorch's own error, for the accuracy rule).
    `dropout_mask` (B, H, L, L) bool: keep these probabilities (scaled by 1 / (1 - dropout_p)) instead of drawing a
    random mask -- what the kernel used, from `attention_with_dropout_mask`.
    """
    compute = q.dtype if not upcast or q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # (B, H, L, L)
    if attention_mask is not None:
        real = (attention_mask != 0)[:, None, None, :]  # (B, 1, 1, L)
        # finfo.min rather than -inf: a row with no real key stays finite (then zeroed), so its gradient is 0 not NaN.
        scores = scores.masked_fill(~real, torch.finfo(compute).min)
    probs = scores.softmax(dim=-1)
    if attention_mask is not None:
        probs = probs * real.any(dim=-1, keepdim=True)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


def attention_varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    dropout_p: float = 0.0, scale: float | None = None, upcast: bool = True, dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """attention_reference applied to each packed sequence of (total, H, D) q, k, v.

    `dropout_mask` (B, H, max_seqlen, max_seqlen) bool: sequence b keeps dropout_mask[b, :, :l, :l] (its tokens'
    positions within the sequence), as `attention_varlen_qkvpacked_with_dropout_mask` returns it.
    """
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, l, D)
        keep = None if dropout_mask is None else dropout_mask[b:b + 1, :, :end - start, :end - start]
        result = attention_reference(*piece, dropout_p=dropout_p, scale=scale, upcast=upcast, dropout_mask=keep)
        out[start:end] = result[0].transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Unpadding


def unpad_input(
    hidden: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(B, L, ...) and a (B, L) mask (nonzero = real token) -> (packed (total, ...), indices, cu_seqlens, max_seqlen).

    indices (total,) int64 are the flat b * L + l positions of the real tokens, in order; cu_seqlens (B + 1,) int32;
    max_seqlen the longest sequence (read on the host: one device synchronisation). Real tokens need not be
    contiguous (left padding, holes): each sequence keeps its real tokens in order.
    """
    hidden = check_tensor("hidden", hidden)
    attention_mask = check_tensor("attention_mask", attention_mask)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (B, L, ...), got {tuple(hidden.shape)}")
    check_shape("attention_mask", attention_mask, hidden.shape[:2])
    check_like("attention_mask", attention_mask, "hidden", hidden, dtype=False)
    real = attention_mask != 0
    seqlens = real.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: (total, ...) -> (batch, seqlen, ...) with zeros at padding positions."""
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return out.index_put((indices,), packed).reshape(batch, seqlen, *packed.shape[1:])


# ---------------------------------------------------------------------------------------------------------------------
# Autograd


@torch.library.custom_op("electra_triton::attention_forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    max_seqlen: int, scale: float, dropout_p: float, rng: torch.Tensor, write_keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, offset = rng.tolist()
    return kernel.attention_forward(q, k, v, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset, write_keep)


def _fake_statistics(q, cu_seqlens, max_seqlen, dropout_p, write_keep) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's lse and keep-mask outputs, as tensors of the right shapes (for the fake implementations)."""
    batch, heads, seqlen = (q.shape[0], q.shape[1], q.shape[2]) if cu_seqlens is None else (
        cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen)
    keep_shape = (batch, heads, seqlen, seqlen) if write_keep and dropout_p > 0.0 else (0,)
    return q.new_empty((batch, heads, seqlen), dtype=torch.float32), q.new_empty(keep_shape, dtype=torch.int8)


@_forward.register_fake
def _(q, k, v, mask, cu_seqlens, max_seqlen, scale, dropout_p, rng, write_keep):
    return torch.empty_like(q), *_fake_statistics(q, cu_seqlens, max_seqlen, dropout_p, write_keep)


@torch.library.custom_op("electra_triton::attention_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float, dropout_p: float,
    rng: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, offset = rng.tolist()
    return kernel.attention_backward(grad_out, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, scale, dropout_p,
                                     seed, offset)


@_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_seqlens, max_seqlen, scale, dropout_p, rng, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_seqlens, rng)
    ctx.scalars = (max_seqlen, scale, dropout_p)
    ctx.set_materialize_grads(False)  # lse and the keep-mask get no gradient: no zero-filled buffers for them


def _autograd_backward(ctx, grad_out, grad_lse, grad_keep):
    q, k, v, out, lse, mask, cu_seqlens, rng = ctx.saved_tensors
    max_seqlen, scale, dropout_p = ctx.scalars
    dq, dk, dv = _backward(grad_out, q, k, v, out, lse, mask, cu_seqlens, max_seqlen, scale, dropout_p, rng)
    return dq, dk, dv, None, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of q, k, v as the kernel takes them: (B, L, 3, H, D) -> (B, H, L, D) each, (T, 3, H, D) -> (T, H, D)."""
    if qkv.dim() == 5:
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def _as_kernel_layout(out: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> the (B, H, L, D) view the kernel takes; (T, H, D) unchanged."""
    return out.transpose(1, 2) if out.dim() == 4 else out


def _packed_output(qkv: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) or (T, H, D), contiguous: reshaping to (..., H * D) for the output projection is free."""
    return qkv.new_empty((*qkv.shape[:-3], *qkv.shape[-2:]))


@torch.library.custom_op("electra_triton::attention_qkvpacked_forward", mutates_args=())
def _qkvpacked_forward(
    qkv: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float,
    dropout_p: float, rng: torch.Tensor, write_keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, offset = rng.tolist()
    out = _packed_output(qkv)
    _, lse, keep = kernel.attention_forward(*_split_qkv(qkv), mask, cu_seqlens, max_seqlen, scale, dropout_p, seed,
                                            offset, write_keep, out=_as_kernel_layout(out))
    return out, lse, keep


@_qkvpacked_forward.register_fake
def _(qkv, mask, cu_seqlens, max_seqlen, scale, dropout_p, rng, write_keep):
    q = _split_qkv(qkv)[0]
    return _packed_output(qkv), *_fake_statistics(q, cu_seqlens, max_seqlen, dropout_p, write_keep)


@torch.library.custom_op("electra_triton::attention_qkvpacked_backward", mutates_args=())
def _qkvpacked_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float, dropout_p: float, rng: torch.Tensor,
) -> torch.Tensor:
    seed, offset = rng.tolist()
    # One contiguous gradient: the dQ and dK/dV kernels write its three slices, nothing is zero-filled or added.
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    kernel.attention_backward(_as_kernel_layout(grad_out), *_split_qkv(qkv), _as_kernel_layout(out), lse, mask,
                              cu_seqlens, max_seqlen, scale, dropout_p, seed, offset, grads=_split_qkv(grad_qkv))
    return grad_qkv


@_qkvpacked_backward.register_fake
def _(grad_out, qkv, out, lse, mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _qkvpacked_setup_context(ctx, inputs, output):
    qkv, mask, cu_seqlens, max_seqlen, scale, dropout_p, rng, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(qkv, out, lse, mask, cu_seqlens, rng)
    ctx.scalars = (max_seqlen, scale, dropout_p)
    ctx.set_materialize_grads(False)


def _qkvpacked_autograd_backward(ctx, grad_out, grad_lse, grad_keep):
    qkv, out, lse, mask, cu_seqlens, rng = ctx.saved_tensors
    grad_qkv = _qkvpacked_backward(grad_out, qkv, out, lse, mask, cu_seqlens, *ctx.scalars, rng)
    return grad_qkv, None, None, None, None, None, None, None


_qkvpacked_forward.register_autograd(_qkvpacked_autograd_backward, setup_context=_qkvpacked_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def quantized_attention_dropout_p(dropout_p: float) -> float:
    """The drop probability the attention kernels apply for `dropout_p`: a multiple of 1/256 (8-bit draws)."""
    return kernel.dropout_threshold(check_dropout_p(dropout_p)) / 256


def _check_qkv(q: object, k: object, v: object, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_shape(name, t, q.shape)
        check_like(name, t, "q", q)


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _kernel_takes(q: torch.Tensor, op: str) -> bool:
    """Whether the kernel runs (else the reference): the dispatch rule, plus a supported head dim."""
    if not use_kernel(op, q.device):
        return False
    head_dim = q.shape[-1]
    if head_dim in HEAD_DIMS:
        return True
    if head_dim not in _warned_head_dims:
        _warned_head_dims.add(head_dim)
        warnings.warn(f"electra_triton.ops.{op}: head dim {head_dim} is not one of {HEAD_DIMS}; running the "
                      "PyTorch reference (slower, L x L memory)", stacklevel=3)
    return False


def _key_padding_mask(attention_mask: object, q: torch.Tensor) -> torch.Tensor | None:
    """(B, L) mask of any bool/integer/float dtype -> int8 view (nonzero = real token) for the kernel."""
    if attention_mask is None:
        return None
    mask = check_tensor("attention_mask", attention_mask)
    if mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or float, got {mask.dtype}")
    check_shape("attention_mask", mask, (q.shape[0], q.shape[2]))
    check_like("attention_mask", mask, "q", q, dtype=False)
    return (mask if mask.dtype == torch.bool else mask != 0).view(torch.int8)


def _check_varlen(cu_seqlens: object, max_seqlen: object, name: str, packed: torch.Tensor) -> None:
    cu_seqlens = check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (B + 1,), got {tuple(cu_seqlens.shape)}")
    check_like("cu_seqlens", cu_seqlens, name, packed, dtype=False)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if not 0 <= max_seqlen <= kernel.MAX_SEQLEN:
        raise ValueError(f"max_seqlen must be in [0, {kernel.MAX_SEQLEN}], got {max_seqlen}")


def _check_qkvpacked(qkv: object, layout: str) -> torch.Tensor:
    qkv = check_float("qkv", qkv)
    rank = layout.count(",") + 1
    if qkv.dim() != rank or qkv.shape[-3] != 3:
        raise ValueError(f"qkv must have shape {layout}, got {tuple(qkv.shape)}")
    return qkv


def _check_padded(q, k, v, attention_mask, dropout_p, scale):
    _check_qkv(q, k, v, 4, "(B, H, L, D)")
    mask = _key_padding_mask(attention_mask, q)
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(scale, q.shape[-1])
    if q.shape[2] > kernel.MAX_SEQLEN:
        raise ValueError(f"q: sequence length {q.shape[2]} exceeds the supported {kernel.MAX_SEQLEN}")
    return mask, dropout_p, scale


# ---------------------------------------------------------------------------------------------------------------------
# Public ops


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, scale: float | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention with a key-padding mask and attention dropout, fused.

    q, k, v (B, H, L, D), float32/float16/bfloat16, same shape, dtype and device, any strides (the output and the
    gradients take q's, k's and v's layout when those are dense, e.g. HF's transposed (B, L, H, D) views).
    attention_mask (B, L), any bool/integer/float dtype: nonzero (1/True) marks a real token, zero a padding key;
    any pattern (right or left padding, holes). A query row without any real key gives zeros and zero gradients.
    dropout_p in [0, 1) drops attention probabilities with a Philox mask seeded from torch's default generator
    (`torch.manual_seed` reproduces it, consecutive calls differ). The kernels draw 8 random bits per element, so
    they apply p rounded to a multiple of 1/256, p' = `quantized_attention_dropout_p(p)` (|p' - p| <= 1/512; 0.1
    becomes 26/256 = 0.1016), and keep-scale by 1 / (1 - p'): the expectation is exact for p'. scale defaults to
    D ** -0.5. Head dims 32, 64, 128 run the kernel; any other runs the reference with a one-time warning.
    Raises TypeError (non-tensors, integer tensors, dtype mismatch, bad scale) or ValueError (rank, shapes, devices,
    dropout_p outside [0, 1), L > 32768).
    """
    mask, dropout_p, scale = _check_padded(q, k, v, attention_mask, dropout_p, scale)
    if not _kernel_takes(q, "attention"):
        return attention_reference(q, k, v, attention_mask, dropout_p, scale)
    return _forward(q, k, v, mask, None, q.shape[2], scale, dropout_p, philox_rng_state(dropout_p), False)[0]


def attention_with_dropout_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug/test entry point: `attention(...)` that also returns the dropout keep-mask it used, (B, H, L, L) bool.

    The output is differentiable and its backward regenerates the same mask, so `attention_reference(...,
    dropout_p=quantized_attention_dropout_p(dropout_p), dropout_mask=keep)` must match output and gradients. Writes
    L x L bytes per head: for small inputs only. Without dropout the mask is all True. On the reference path the
    mask is drawn with torch.rand (same keep rate, different stream).
    """
    mask, dropout_p, scale = _check_padded(q, k, v, attention_mask, dropout_p, scale)
    batch, heads, seqlen, _ = q.shape
    if dropout_p == 0.0:
        keep = torch.ones((batch, heads, seqlen, seqlen), dtype=torch.bool, device=q.device)
        return attention(q, k, v, attention_mask, 0.0, scale), keep
    if not _kernel_takes(q, "attention"):
        dropout_p = quantized_attention_dropout_p(dropout_p)
        keep = torch.rand((batch, heads, seqlen, seqlen), device=q.device) >= dropout_p
        return attention_reference(q, k, v, attention_mask, dropout_p, scale, dropout_mask=keep), keep
    out, _, keep = _forward(q, k, v, mask, None, seqlen, scale, dropout_p, philox_rng_state(dropout_p), True)
    return out, keep.view(torch.bool)


def attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    dropout_p: float = 0.0, scale: float | None = None,
) -> torch.Tensor:
    """attention over packed sequences: q, k, v (total, H, D); sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1].

    cu_seqlens (B + 1,) int32 on q's device, non-decreasing from 0 to total (not verified on the device: that would
    synchronise); max_seqlen an int >= the longest sequence. Each sequence attends only to itself, so padding costs
    nothing. Dropout as `attention`; with the same seed, sequence b's mask equals the padded op's for a
    right-padded batch of length max_seqlen. Returns (total, H, D).
    """
    _check_qkv(q, k, v, 3, "(total, H, D)")
    _check_varlen(cu_seqlens, max_seqlen, "q", q)
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(scale, q.shape[-1])
    if not _kernel_takes(q, "attention_varlen"):
        return attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)
    rng = philox_rng_state(dropout_p)
    return _forward(q, k, v, None, cu_seqlens, max_seqlen, scale, dropout_p, rng, False)[0]


def _keep_mask(written: torch.Tensor, wanted: bool, dropout_p: float, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The keep-mask a debug entry point returns (all True without dropout); None for the training path, which must
    not allocate an L x L mask per head."""
    if not wanted:
        return None
    if dropout_p == 0.0:
        return torch.ones(shape, dtype=torch.bool, device=written.device)
    return written.view(torch.bool)


def _qkvpacked(
    qkv: torch.Tensor, attention_mask: torch.Tensor | None, dropout_p: float, scale: float | None, write_keep: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out (B, L, H, D), keep (B, H, L, L) bool, all True without dropout; None unless write_keep) of the padded
    qkv-packed op."""
    qkv = _check_qkvpacked(qkv, "(B, L, 3, H, D)")
    q, k, v = _split_qkv(qkv)
    mask, dropout_p, scale = _check_padded(q, k, v, attention_mask, dropout_p, scale)
    batch, heads, seqlen, _ = q.shape
    if not _kernel_takes(q, "attention_qkvpacked"):
        dropout_p = quantized_attention_dropout_p(dropout_p) if write_keep else dropout_p
        keep = torch.rand((batch, heads, seqlen, seqlen), device=q.device) >= dropout_p if write_keep else None
        out = attention_reference(q, k, v, attention_mask, dropout_p, scale, dropout_mask=keep)
        return out.transpose(1, 2).contiguous(), keep  # contiguous as the kernel's: callers .view it
    out, _, keep = _qkvpacked_forward(qkv, mask, None, seqlen, scale, dropout_p, philox_rng_state(dropout_p),
                                      write_keep and dropout_p > 0.0)
    return out, _keep_mask(keep, write_keep, dropout_p, (batch, heads, seqlen, seqlen))


def attention_qkvpacked(
    qkv: torch.Tensor, attention_mask: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
) -> torch.Tensor:
    """`attention` on q, k, v packed in one tensor, the output of one fused QKV projection: no copies either way.

    qkv (B, L, 3, H, D), any strides (typically `F.linear(x, W_qkv, b_qkv).view(B, L, 3, H, D)`); qkv[:, :, 0] is q,
    1 is k, 2 is v. Returns (B, L, H, D), contiguous, so `.reshape(B, L, H * D)` is free. The kernels read q, k and v
    out of qkv by strides, and the backward returns one contiguous gradient of qkv's shape whose three slices the
    dQ and dK/dV kernels write directly (no zero-filled buffers and adds, as autograd does for views of qkv).
    attention_mask, dropout_p and scale as `attention`. Raises TypeError/ValueError naming the argument.
    """
    return _qkvpacked(qkv, attention_mask, dropout_p, scale, write_keep=False)[0]


def attention_qkvpacked_with_dropout_mask(
    qkv: torch.Tensor, attention_mask: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug/test entry point: `attention_qkvpacked(...)` that also returns the keep-mask used, (B, H, L, L) bool.

    As `attention_with_dropout_mask`: the backward regenerates the same mask, so `attention_reference` on q, k, v
    with `dropout_mask=keep` and the quantised p must match the output and gradients. For small inputs only.
    """
    return _qkvpacked(qkv, attention_mask, dropout_p, scale, write_keep=True)


def _varlen_qkvpacked(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float, scale: float | None,
    write_keep: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out (T, H, D), keep (B, H, max_seqlen, max_seqlen) bool; None unless write_keep) of the varlen qkv-packed
    op."""
    qkv = _check_qkvpacked(qkv, "(T, 3, H, D)")
    _check_varlen(cu_seqlens, max_seqlen, "qkv", qkv)
    dropout_p = check_dropout_p(dropout_p)
    scale = _check_scale(scale, qkv.shape[-1])
    q, k, v = _split_qkv(qkv)
    keep_shape = (cu_seqlens.numel() - 1, qkv.shape[2], max_seqlen, max_seqlen)
    if not _kernel_takes(q, "attention_varlen_qkvpacked"):
        dropout_p = quantized_attention_dropout_p(dropout_p) if write_keep else dropout_p
        keep = torch.rand(keep_shape, device=q.device) >= dropout_p if write_keep else None
        return attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, dropout_mask=keep), keep
    out, _, keep = _qkvpacked_forward(qkv, None, cu_seqlens, max_seqlen, scale, dropout_p,
                                      philox_rng_state(dropout_p), write_keep and dropout_p > 0.0)
    return out, _keep_mask(keep, write_keep, dropout_p, keep_shape)


def attention_varlen_qkvpacked(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float = 0.0, scale: float | None = None,
) -> torch.Tensor:
    """`attention_varlen` on q, k, v packed in one (T, 3, H, D) tensor (any strides), as `attention_qkvpacked`.

    cu_seqlens (B + 1,) int32 on qkv's device; max_seqlen an int >= the longest sequence: an upper bound such as
    the padded row length works (it only launches programs that exit at once, and sets the dropout counters' row
    stride, which the backward reuses). With the same seed and max_seqlen = L, sequence b's dropout mask equals the
    padded op's for a right-padded batch of length L. Returns (T, H, D), contiguous: `.reshape(T, H * D)` is free.
    The backward returns one contiguous gradient of qkv's shape, written by the kernels.
    """
    return _varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p, scale, write_keep=False)[0]


def attention_varlen_qkvpacked_with_dropout_mask(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float = 0.0, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug/test entry point: `attention_varlen_qkvpacked(...)` and its keep-mask, (B, H, max_seqlen, max_seqlen)
    bool, where [b, h, i, j] is the mask of sequence b's i-th query and j-th key (positions within the sequence;
    entries past a sequence's length are unused). `attention_varlen_reference(..., dropout_mask=keep)` on the views
    qkv[:, 0], qkv[:, 1], qkv[:, 2], with the quantised p, must match the output and gradients. For small inputs.
    """
    return _varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p, scale, write_keep=True)
