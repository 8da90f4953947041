"""Fused BERT-style embeddings: y = dropout(LayerNorm(word[input_id] + position[position_id] + token_type[type_id])),
one token row at a time, with its backward.

Forward: one pass per block of token rows (BLOCK_M rows x the whole embedding dim in registers): the three table rows
are gathered and summed in fp32, mean and variance taken in fp32, the LayerNorm applied with its weight and bias read
as fp32, then dropout with the keep-mask of kernels/layer_norm.py's Philox scheme (`philox_keep_mask`, counters
(offset + column / 4, token row)), and y written in the output dtype (the autocast dtype under autocast: the cast the
encoder used to make is part of the store), with mean and rstd (fp32, per row) for the backward. A debug flag also
writes the keep-mask (uint8).

Backward: one pass per group of rows (persistent programs, as the layer_norm backward) computing the gradient of the
sum h = word + position + type: d_ln = dy * keep / (1 - p) (the mask regenerated from the same seed), d_h = rstd *
(w*d_ln - mean(w*d_ln) - xhat * mean(w*d_ln*xhat)). h is recomputed from the three gathers, not saved: saving it
would write 4 bytes x dim per token in the forward and read them back (plus the memory for the step), where
recomputing reads the word row again (the position and type tables, 1.5 MB and 6 KB for ELECTRA-base, stay in L2) --
half the DRAM traffic. Each program accumulates fp32 column partials of d_weight = sum(d_ln * xhat), d_bias =
sum(d_ln) and the token-type table's gradient (with token types: per type, summed over the tile's rows and added to
the program's own partial row, a slot no other program touches; without them every row has type 0 and the sum stays
in registers), reduced by the launcher in a fixed order (deterministic). The word and position tables' dense fp32
gradients are scatter-added with atomics, one per element of d_h, skipping the tables' padding_idx as nn.Embedding
does: no sort and no per-row segment pass as embedding_dense_backward does, at the price of a summation order that
varies between runs (as index_add_ on CUDA). Contention is low: a row of the word table is hit once per occurrence
of its token, a position row once per sequence.

Ids: int64, (n_seqs, seq_len) with any strides (0 for position ids broadcast over the batch), token row r at (r //
seq_len, r % seq_len); they are not bounds-checked (that would need a host sync): the caller's contract. Any number of
rows, any dim up to 16384 (a row block must fit in registers). Tables contiguous in fp32, fp16 or bf16, LayerNorm
weight and bias in the tables' dtype or fp32; y in any of the three; statistics and table gradients in fp32.
"""

import torch
import triton
import triton.language as tl

from . import layer_norm
from ._compile import CompileTarget, row_pass_targets
from ._launch import programs_per_device
from .layer_norm import philox_keep_mask

MAX_HIDDEN = layer_norm.MAX_HIDDEN  # a row block in registers, with layer_norm's row blocks


@triton.jit
def _gathered_sum(
    ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_table_ptr, type_table_ptr, rows, cols, row_ok, col_ok,
    n_cols, seq_len, stride_is, stride_il, stride_ps, stride_pl, stride_ts, stride_tl, HAS_TYPES: tl.constexpr,
):
    """h = word + position + type rows in fp32 for a tile of token rows (zero outside the tile's columns), and the
    rows' word, position and type ids (forward and backward)."""
    seq, tok = rows // seq_len, rows % seq_len
    word_ids = tl.load(ids_ptr + seq * stride_is + tok * stride_il, mask=row_ok, other=0).to(tl.int64)
    pos_ids = tl.load(pos_ids_ptr + seq * stride_ps + tok * stride_pl, mask=row_ok, other=0).to(tl.int64)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    h = tl.load(word_ptr + word_ids[:, None] * n_cols + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    h += tl.load(pos_table_ptr + pos_ids[:, None] * n_cols + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_TYPES:
        type_ids = tl.load(type_ids_ptr + seq * stride_ts + tok * stride_tl, mask=row_ok, other=0).to(tl.int64)
        h += tl.load(type_table_ptr + type_ids[:, None] * n_cols + cols[None, :], mask=tile_ok,
                     other=0.0).to(tl.float32)
    else:  # every token has type 0: one row, broadcast
        type_ids = tl.zeros_like(word_ids)
        h += tl.where(row_ok[:, None], tl.load(type_table_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :],
                      0.0)
    return h, word_ids, pos_ids, type_ids


# seed and offset change every call: unspecialised, so that one compiled kernel serves them all.
@triton.jit(do_not_specialize=["seed", "offset"])
def _embeddings_ln_fwd_kernel(
    ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_table_ptr, type_table_ptr, w_ptr, b_ptr,
    y_ptr, mean_ptr, rstd_ptr, mask_ptr,
    n_rows, n_cols, seq_len, stride_is, stride_il, stride_ps, stride_pl, stride_ts, stride_tl,
    eps, dropout_p, seed, offset,
    HAS_TYPES: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows * n_cols > 2**31
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    h, _, _, _ = _gathered_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_table_ptr, type_table_ptr, rows,
                               cols, row_ok, col_ok, n_cols, seq_len, stride_is, stride_il, stride_ps, stride_pl,
                               stride_ts, stride_tl, HAS_TYPES)

    mean = tl.sum(h, axis=1) / n_cols
    centered = tl.where(tile_ok, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    y = centered * rstd[:, None] * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    keep = tile_ok
    if HAS_DROPOUT:
        keep = philox_keep_mask(rows, dropout_p, seed, offset, BLOCK_M, BLOCK_N)
        y = tl.where(keep, y / (1.0 - dropout_p), 0.0)
    out_offsets = rows[:, None] * n_cols + cols[None, :]
    tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if STORE_MASK:
        tl.store(mask_ptr + out_offsets, keep.to(tl.uint8), mask=tile_ok)


@triton.jit(do_not_specialize=["seed", "offset"])
def _embeddings_ln_bwd_kernel(
    dy_ptr, ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_table_ptr, type_table_ptr, w_ptr, mean_ptr, rstd_ptr,
    d_word_ptr, d_pos_table_ptr, partials_ptr,
    n_rows, n_cols, seq_len, stride_is, stride_il, stride_ps, stride_pl, stride_ts, stride_tl, stride_dym,
    rows_per_program, n_groups, n_types, word_padding_idx, position_padding_idx, dropout_p, seed, offset,
    HAS_TYPES: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # partials: fp32 (2 + n_types, n_groups, n_cols): d_weight, d_bias, then one slot per token type.
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    d_type0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first_row = group * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    for r0 in range(first_row, last_row, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < last_row
        tile_ok = row_ok[:, None] & col_ok[None, :]
        h, word_ids, pos_ids, type_ids = _gathered_sum(
            ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_table_ptr, type_table_ptr, rows, cols, row_ok, col_ok,
            n_cols, seq_len, stride_is, stride_il, stride_ps, stride_pl, stride_ts, stride_tl, HAS_TYPES)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(tile_ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        d_ln = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = philox_keep_mask(rows, dropout_p, seed, offset, BLOCK_M, BLOCK_N)
            d_ln = tl.where(keep, d_ln / (1.0 - dropout_p), 0.0)
        wd = d_ln * w
        c1 = tl.sum(xhat * wd, axis=1) / n_cols
        c2 = tl.sum(wd, axis=1) / n_cols
        dh = (wd - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]  # zero outside the tile
        dw += d_ln * xhat
        db += d_ln
        word_ok = tile_ok & (word_ids != word_padding_idx)[:, None]
        tl.atomic_add(d_word_ptr + word_ids[:, None] * n_cols + cols[None, :], dh, mask=word_ok, sem="relaxed")
        pos_ok = tile_ok & (pos_ids != position_padding_idx)[:, None]
        tl.atomic_add(d_pos_table_ptr + pos_ids[:, None] * n_cols + cols[None, :], dh, mask=pos_ok, sem="relaxed")
        if HAS_TYPES:
            for token_type in range(n_types):
                type_sum = tl.sum(tl.where((type_ids == token_type)[:, None], dh, 0.0), axis=0)
                slot = partials_ptr + ((2 + token_type) * n_groups + group) * n_cols + cols
                tl.atomic_add(slot, type_sum, mask=col_ok, sem="relaxed")  # this program's own slot: no contention
        else:
            d_type0 += dh
    tl.store(partials_ptr + group * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)
    tl.store(partials_ptr + (n_groups + group) * n_cols + cols, tl.sum(db, axis=0), mask=col_ok)
    if not HAS_TYPES:
        tl.store(partials_ptr + (2 * n_groups + group) * n_cols + cols, tl.sum(d_type0, axis=0), mask=col_ok)


def launch_config(n_cols: int, backward: bool) -> dict[str, int]:
    """layer_norm's row blocks (~4K elements) and forward; the backward at 8 elements per thread (16 warps): it holds
    more per element than the LayerNorm backward (the token-type accumulator, two tables' 64-bit scatter addresses),
    and at layer_norm's 16 per thread it took 199-216 registers, one 8-warp block per SM; at 8 it takes 99-126, one
    16-warp block (sm_90a, triton 3.9, 2026-12-01; both checked by the compile check)."""
    config = layer_norm.launch_config(n_cols, backward=False)
    if backward:
        config["num_warps"] = min(16, max(4, config["BLOCK_M"] * config["BLOCK_N"] // (32 * 8)))
    return config


def _id_layout(ids: torch.Tensor) -> tuple[int, int]:
    """(sequence stride, token stride) of (n_seqs, seq_len) ids."""
    return ids.stride(0), ids.stride(1)


def embeddings_layer_norm_forward(
    input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None, word: torch.Tensor,
    position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    dropout_p: float, seed: int, offset: int, out_dtype: torch.dtype, store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 ids (n_seqs, seq_len) of any strides (token_type_ids None: type 0), contiguous tables (rows, N) ->
    (y (n_seqs * seq_len, N) in out_dtype, mean, rstd (rows,) fp32, keep-mask uint8 (rows, N) if `store_mask` else
    empty)."""
    n_seqs, seq_len = input_ids.shape
    n_rows, n_cols = n_seqs * seq_len, word.shape[1]
    config = launch_config(n_cols, backward=False)
    y = torch.empty((n_rows, n_cols), device=word.device, dtype=out_dtype)
    mean = torch.empty((n_rows,), device=word.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    mask = torch.empty((n_rows, n_cols) if store_mask else (0,), device=word.device, dtype=torch.uint8)
    types = token_type_ids if token_type_ids is not None else input_ids
    if n_rows > 0:
        _embeddings_ln_fwd_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](
            input_ids, position_ids, types, word, position, token_type, weight, bias, y, mean, rstd, mask,
            n_rows, n_cols, seq_len, *_id_layout(input_ids), *_id_layout(position_ids), *_id_layout(types),
            eps, dropout_p, seed, offset,
            HAS_TYPES=token_type_ids is not None, HAS_DROPOUT=dropout_p > 0, STORE_MASK=store_mask,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )
    return y, mean, rstd, mask


def embeddings_layer_norm_backward(
    grad_y: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
    word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, word_padding_idx: int, position_padding_idx: int, dropout_p: float, seed: int, offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_y (rows, N) with unit column stride -> (d_word, d_position in the tables' dtype, column sums (2 +
    token types, N) fp32: d_weight, d_bias, then the token-type table's gradient). A padding index of -1: none."""
    n_seqs, seq_len = input_ids.shape
    n_rows, n_cols = n_seqs * seq_len, word.shape[1]
    n_types = token_type.shape[0]
    config = launch_config(n_cols, backward=True)
    rows_per_program = triton.cdiv(max(n_rows, 1), programs_per_device(word.device))
    rows_per_program = triton.cdiv(rows_per_program, config["BLOCK_M"]) * config["BLOCK_M"]
    n_groups = max(1, triton.cdiv(n_rows, rows_per_program))
    d_word = torch.zeros(word.shape, device=word.device, dtype=torch.float32)
    d_position = torch.zeros(position.shape, device=word.device, dtype=torch.float32)
    partials = torch.zeros((2 + n_types, n_groups, n_cols), device=word.device, dtype=torch.float32)
    types = token_type_ids if token_type_ids is not None else input_ids
    if n_rows > 0:
        _embeddings_ln_bwd_kernel[(n_groups,)](
            grad_y, input_ids, position_ids, types, word, position, token_type, weight, mean, rstd,
            d_word, d_position, partials,
            n_rows, n_cols, seq_len, *_id_layout(input_ids), *_id_layout(position_ids), *_id_layout(types),
            grad_y.stride(0), rows_per_program, n_groups, n_types, word_padding_idx, position_padding_idx,
            dropout_p, seed, offset,
            HAS_TYPES=token_type_ids is not None, HAS_DROPOUT=dropout_p > 0, BLOCK_M=config["BLOCK_M"],
            BLOCK_N=config["BLOCK_N"], num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return d_word.to(word.dtype), d_position.to(position.dtype), partials.sum(dim=1)


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """The presets' embedding sizes: every flag combination (token types, dropout) at the production layout (fp32
    tables, bf16 output: autocast), and each other layout (fp32 or fp16 output of fp32 tables, 16-bit tables) once
    with every flag on; the debug mask store once per size. The flags add code, not registers held across it, and the
    dtypes change only load and store widths, so this keeps the compile check short without leaving a register
    budget unchecked."""
    sizes = sorted({m["embedding_size"] for m in models})
    production = ("*fp32", "*bf16")  # (tables and LayerNorm parameters, output)
    layouts = [production, ("*fp32", "*fp32"), ("*fp32", "*fp16"), ("*fp16", "*fp16"), ("*bf16", "*bf16")]
    targets = []
    for n_cols in sizes:
        fwd, bwd = launch_config(n_cols, backward=False), launch_config(n_cols, backward=True)
        blocks = {"BLOCK_M": fwd["BLOCK_M"], "BLOCK_N": fwd["BLOCK_N"]}  # the same in both passes
        ints = {"n_rows": 16384, "n_cols": n_cols, "seq_len": 512, "stride_is": 512, "stride_il": 1, "stride_ps": 0,
                "stride_pl": 1, "stride_ts": 512, "stride_tl": 1, "stride_dym": n_cols, "rows_per_program": 32,
                "n_groups": 528, "n_types": 2, "word_padding_idx": 0, "position_padding_idx": -1, "seed": 12345,
                "offset": 678}
        scalars = {"eps": "fp32", "dropout_p": "fp32"}
        fwd_launch, bwd_launch = ({"num_warps": c["num_warps"], "num_stages": c["num_stages"],
                                   "multiplies_matrices": False} for c in (fwd, bwd))
        for tables, out in layouts:
            pointers = {
                **dict.fromkeys(["ids_ptr", "pos_ids_ptr", "type_ids_ptr"], "*i64"),
                **dict.fromkeys(["word_ptr", "pos_table_ptr", "type_table_ptr", "w_ptr", "b_ptr"], tables),
                **dict.fromkeys(["y_ptr", "dy_ptr"], out),
                **dict.fromkeys(["mean_ptr", "rstd_ptr", "d_word_ptr", "d_pos_table_ptr", "partials_ptr"], "*fp32"),
                "mask_ptr": "*u8",
            }
            flag_sets = [(t, d) for t in (True, False) for d in (True, False)] if (tables, out) == production else \
                [(True, True)]
            for has_types, dropout in flag_sets:
                flags = {"HAS_TYPES": has_types, "HAS_DROPOUT": dropout}
                what = f"N={n_cols} tables={tables[1:]} out={out[1:]} types={has_types} dropout={dropout}"
                masks = (False, True) if (tables, out) == production and has_types and dropout else (False,)
                targets += row_pass_targets(
                    _embeddings_ln_fwd_kernel, _embeddings_ln_bwd_kernel, pointers=pointers, ints=ints, scalars=scalars,
                    constexprs={**flags, **blocks}, store_masks=masks, label=what,
                    forward_launch=fwd_launch, backward_launch=bwd_launch)
    return targets
