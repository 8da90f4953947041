"""embeddings_layer_norm: BERT-style embeddings (word + position + token type, LayerNorm, dropout) in one pass
(kernels/embeddings.py), its reference, a debug entry point returning the dropout mask, and checks."""

import torch
import torch.nn.functional as F

from ..kernels import embeddings as kernel
from ._checks import FLOAT_DTYPES, check_dropout_p, check_eps, check_float, check_like, check_norm_param, check_tensor
from ._dispatch import philox_rng_state, use_kernel

_NO_PADDING = -1  # the kernel's "no padding index": ids are never negative


def embeddings_layer_norm_reference(
    input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
    word_weight: torch.Tensor, position_weight: torch.Tensor, token_type_weight: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, eps: float, dropout_p: float = 0.0, *, out_dtype: torch.dtype | None = None,
    word_padding_idx: int | None = None, position_padding_idx: int | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch, as transformers' BertEmbeddings computes it: F.embedding of each table (a padding index keeps
    its row's gradient zero), summed in the tables' dtype, LayerNorm (in fp32 when weight and bias are fp32 and the
    tables 16-bit), dropout, then cast to `out_dtype` (default: the tables' dtype). token_type_ids None: type 0.
    With `keep_mask` (bool, the output's shape), that mask replaces F.dropout's random one (kept elements scaled by
    1 / (1 - dropout_p)), to compare with the kernel."""
    types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
    h = F.embedding(input_ids, word_weight, word_padding_idx) + F.embedding(types, token_type_weight)
    h = h + F.embedding(position_ids, position_weight, position_padding_idx)
    if weight.dtype == h.dtype and bias.dtype == h.dtype:
        y = F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    else:
        y = F.layer_norm(h.float(), h.shape[-1:], weight.float(), bias.float(), eps).to(h.dtype)
    if keep_mask is not None:
        y = torch.where(keep_mask, y / (1.0 - dropout_p), 0.0).to(y.dtype)
    elif dropout_p > 0:
        y = F.dropout(y, dropout_p)
    return y.to(out_dtype or word_weight.dtype)


@torch.library.custom_op("electra_triton::embeddings_layer_norm_forward", mutates_args=())
def _forward(
    input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None, word: torch.Tensor,
    position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    dropout_p: float, rng: torch.Tensor, out_dtype: torch.dtype, word_padding_idx: int, position_padding_idx: int,
    store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, offset = rng.tolist()
    return kernel.embeddings_layer_norm_forward(input_ids, position_ids, token_type_ids, word, position, token_type,
                                                weight, bias, eps, dropout_p, seed, offset, out_dtype, store_mask)


@_forward.register_fake
def _(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias, eps, dropout_p, rng,
      out_dtype, word_padding_idx, position_padding_idx, store_mask):
    rows, n_cols = input_ids.numel(), word.shape[1]
    stat = word.new_empty(rows, dtype=torch.float32)
    return (word.new_empty((rows, n_cols), dtype=out_dtype), stat, stat.clone(),
            word.new_empty((rows, n_cols) if store_mask else (0,), dtype=torch.uint8))


@torch.library.custom_op("electra_triton::embeddings_layer_norm_backward", mutates_args=())
def _backward(
    grad_y: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
    word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, word_padding_idx: int, position_padding_idx: int, dropout_p: float, rng: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, offset = rng.tolist()
    return kernel.embeddings_layer_norm_backward(grad_y, input_ids, position_ids, token_type_ids, word, position,
                                                 token_type, weight, mean, rstd, word_padding_idx,
                                                 position_padding_idx, dropout_p, seed, offset)


@_backward.register_fake
def _(grad_y, input_ids, position_ids, token_type_ids, word, position, token_type, weight, mean, rstd,
      word_padding_idx, position_padding_idx, dropout_p, rng):
    return (torch.empty_like(word), torch.empty_like(position),
            word.new_empty((2 + token_type.shape[0], word.shape[1]), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias, _, dropout_p, rng, _,
     word_padding_idx, position_padding_idx, _) = inputs
    _, mean, rstd, _ = output
    # The backward recomputes the embeddings' sum from the ids and tables (kernels/embeddings.py says why): only the
    # ids and the fp32 row statistics are saved beyond the parameters.
    ctx.save_for_backward(input_ids, position_ids, token_type_ids, word, position, token_type, weight, mean, rstd, rng)
    ctx.bias_dtype = bias.dtype
    ctx.padding = (word_padding_idx, position_padding_idx)
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # mean, rstd and the mask get no gradient: no zero-filled buffers for them


def _autograd_backward(ctx, grad_y, grad_mean, grad_rstd, grad_mask):
    input_ids, position_ids, token_type_ids, word, position, token_type, weight, mean, rstd, rng = ctx.saved_tensors
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    d_word, d_position, sums = _backward(grad_y, input_ids, position_ids, token_type_ids, word, position, token_type,
                                         weight, mean, rstd, *ctx.padding, ctx.dropout_p, rng)
    # One reduction gave the three column sums; an op may not return views of one tensor, autograd may.
    d_weight, d_bias, d_token_type = sums[0], sums[1], sums[2:]
    return (None, None, None, d_word, d_position, d_token_type.to(token_type.dtype), d_weight.to(weight.dtype),
            d_bias.to(ctx.bias_dtype), None, None, None, None, None, None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_ids(name: str, ids: object, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Integer ids (int32/int64) on input_ids' device and broadcastable to its shape; returned as int64 of that
    shape (a view when they are int64 already)."""
    ids = check_tensor(name, ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {ids.dtype}")
    if input_ids is None:
        if ids.dim() not in (1, 2):
            raise ValueError(f"{name} must have shape (B, L) or (tokens,), got {tuple(ids.shape)}")
        return ids.long()
    check_like(name, ids, "input_ids", input_ids, dtype=False)
    if ids.dim() > input_ids.dim() or any(n not in (1, m) for n, m in zip(ids.shape[::-1], input_ids.shape[::-1])):
        raise ValueError(f"{name} must be broadcastable to input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(ids.shape)}")
    return ids.long().expand(input_ids.shape)


def _check_padding_idx(name: str, padding_idx: object, rows: int) -> int:
    """nn.Embedding's padding_idx rule: None, or an int in [-rows, rows) (negative counts from the end)."""
    if padding_idx is None:
        return _NO_PADDING
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"{name} must be an int or None, got {type(padding_idx).__name__}")
    if not -rows <= padding_idx < rows:
        raise ValueError(f"{name} must be in [-{rows}, {rows}) for a table of {rows} rows, got {padding_idx}")
    return padding_idx % rows


def _check(
    input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, weight, bias, eps,
    dropout_p, out_dtype, word_padding_idx, position_padding_idx,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype, int, int, float, float]:
    """Checked and normalised arguments: (input_ids, position_ids, token_type_ids (None stays None), all int64 of
    input_ids' shape, out_dtype, word and position padding indices (-1: none), eps, dropout_p)."""
    input_ids = _check_ids("input_ids", input_ids)
    position_ids = _check_ids("position_ids", position_ids, input_ids)
    if token_type_ids is not None:
        token_type_ids = _check_ids("token_type_ids", token_type_ids, input_ids)
    word_weight = check_float("word_weight", word_weight)
    if word_weight.dim() != 2 or 0 in word_weight.shape:
        raise ValueError(f"word_weight must have shape (vocab, N) with vocab, N >= 1, got {tuple(word_weight.shape)}")
    n_cols = word_weight.shape[1]
    if n_cols > kernel.MAX_HIDDEN:
        raise ValueError(f"word_weight's embedding dim must be at most {kernel.MAX_HIDDEN}, got {n_cols}")
    check_like("input_ids", input_ids, "word_weight", word_weight, dtype=False)
    for name, table in (("position_weight", position_weight), ("token_type_weight", token_type_weight)):
        check_like(name, check_float(name, table), "word_weight", word_weight)
        if table.dim() != 2 or table.shape[0] == 0 or table.shape[1] != n_cols:
            raise ValueError(f"{name} must have shape (rows >= 1, {n_cols}), got {tuple(table.shape)}")
    check_norm_param("weight", weight, "word_weight", word_weight, n_cols)
    check_norm_param("bias", bias, "word_weight", word_weight, n_cols)
    if out_dtype is None:
        out_dtype = word_weight.dtype
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16, bfloat16 or None, got {out_dtype}")
    return (input_ids, position_ids, token_type_ids, out_dtype,
            _check_padding_idx("word_padding_idx", word_padding_idx, word_weight.shape[0]),
            _check_padding_idx("position_padding_idx", position_padding_idx, position_weight.shape[0]),
            check_eps(eps), check_dropout_p(dropout_p))


def _run(input_ids, position_ids, token_type_ids, tables, weight, bias, eps, dropout_p, out_dtype, padding,
         store_mask):
    # (B, L) stays as it is, (tokens,) is one sequence: the kernel reads ids through (sequence, token) strides.
    as_sequences = (lambda ids: ids) if input_ids.dim() == 2 else (lambda ids: ids.unsqueeze(0))
    y, _, _, mask = _forward(
        as_sequences(input_ids), as_sequences(position_ids),
        None if token_type_ids is None else as_sequences(token_type_ids), *(t.contiguous() for t in tables), weight,
        bias, eps, dropout_p, philox_rng_state(dropout_p), out_dtype, *padding, store_mask)
    shape = (*input_ids.shape, tables[0].shape[1])
    return y.view(shape), mask.view(shape).bool() if store_mask else None


def embeddings_layer_norm(
    input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
    word_weight: torch.Tensor, position_weight: torch.Tensor, token_type_weight: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, eps: float, dropout_p: float = 0.0, *, out_dtype: torch.dtype | None = None,
    word_padding_idx: int | None = None, position_padding_idx: int | None = None,
) -> torch.Tensor:
    """`dropout(LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids]))` in one pass, as
    transformers' BertEmbeddings / ElectraEmbeddings compute it from ids.

    input_ids (B, L) or (tokens,), int64 or int32 (int32 is widened: one small copy); position_ids and token_type_ids
    broadcastable to its shape (e.g. (1, L) position ids), token_type_ids None meaning type 0 everywhere (as
    transformers' zero buffer). Ids are not range-checked (that would synchronise with the device): out-of-range ids
    are the caller's error, as with F.embedding on CUDA. Tables (vocab, N), (positions, N), (types, N) of one float
    dtype and device; weight and bias (N,) in that dtype or float32. Statistics in fp32; the output is (*input_ids'
    shape, N) in `out_dtype` (default: the tables' dtype; the autocast dtype under autocast, so the cast is free).
    Dropout whenever dropout_p > 0 (the caller decides from its training mode), a Philox mask drawn from torch's
    generator and regenerated for the backward. Gradients: every table (dense, in its dtype; the padding indices'
    rows stay zero, as nn.Embedding(padding_idx=...)), weight and bias.
    """
    input_ids, position_ids, token_type_ids, out_dtype, word_pad, position_pad, eps, dropout_p = _check(
        input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, weight, bias, eps,
        dropout_p, out_dtype, word_padding_idx, position_padding_idx)
    if not use_kernel("embeddings_layer_norm", word_weight.device):
        return embeddings_layer_norm_reference(
            input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, weight, bias, eps,
            dropout_p, out_dtype=out_dtype, word_padding_idx=word_padding_idx,
            position_padding_idx=position_padding_idx)
    return _run(input_ids, position_ids, token_type_ids, (word_weight, position_weight, token_type_weight), weight,
                bias, eps, dropout_p, out_dtype, (word_pad, position_pad), store_mask=False)[0]


def embeddings_layer_norm_with_mask(
    input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
    word_weight: torch.Tensor, position_weight: torch.Tensor, token_type_weight: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, eps: float, dropout_p: float = 0.0, *, out_dtype: torch.dtype | None = None,
    word_padding_idx: int | None = None, position_padding_idx: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug entry point: embeddings_layer_norm's output and the boolean keep-mask (the output's shape) it applied,
    for tests against `embeddings_layer_norm_reference(..., keep_mask=mask)`. Differentiable like the plain op."""
    input_ids, position_ids, token_type_ids, out_dtype, word_pad, position_pad, eps, dropout_p = _check(
        input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, weight, bias, eps,
        dropout_p, out_dtype, word_padding_idx, position_padding_idx)
    if not use_kernel("embeddings_layer_norm", word_weight.device):
        keep = torch.rand((*input_ids.shape, word_weight.shape[1]), device=word_weight.device) >= dropout_p
        return embeddings_layer_norm_reference(
            input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, weight, bias, eps,
            dropout_p, out_dtype=out_dtype, word_padding_idx=word_padding_idx,
            position_padding_idx=position_padding_idx, keep_mask=keep), keep
    return _run(input_ids, position_ids, token_type_ids, (word_weight, position_weight, token_type_weight), weight,
                bias, eps, dropout_p, out_dtype, (word_pad, position_pad), store_mask=True)
