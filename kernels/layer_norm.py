"""Fused dropout + residual add + LayerNorm: y = LayerNorm(dropout(x) + residual) over the last dim, with its backward.

Forward: one pass per block of rows (BLOCK_M rows x the whole hidden dim in registers): the dropout keep-mask comes
from Philox, all four 32-bit outputs of each call used (counters (offset + col / 4, row, 0, 0) for columns
col..col+3: a quarter of the calls of one `tl.rand` per element), an element is kept when its uniform draw is >= p,
kept elements are scaled by 1 / (1 - p), the residual is added,
mean and variance are taken in fp32, and y, mean and rstd (fp32, per row) are written. Neither the mask nor the sum
h = dropout(x) + residual is stored: the backward regenerates the mask from the same seed and recomputes h from x and
the residual, which autograd keeps alive anyway (the same traffic as storing h, without its memory). A debug flag
also writes the keep-mask (uint8) so that tests can compare against a reference applying the same mask.

Backward: one pass per row block for d_h = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)), writing d_residual =
d_h and d_x = d_h * keep / (1 - p); each program accumulates d_weight = sum(dy * xhat) and d_bias = sum(dy) over
its rows into fp32 partials, summed by the launcher in a fixed order (deterministic, no atomics).

Variants by constexpr: no residual (the embeddings' LayerNorm), no dropout, no weight and/or no bias
(elementwise_affine=False). Any number of rows, any hidden size up to 16384 (one row block must fit in registers),
rows of any stride with unit stride along the hidden dim (the op makes other layouts contiguous). fp32, fp16, bf16
inputs, fp32 statistics; output, d_x and d_residual in the input dtype. Weight and bias may be fp32 while x and the
residual are fp16/bf16 (a 16-bit residual stream with fp32 parameters, as under autocast): they are read as fp32
either way, and d_weight / d_bias come back in their own dtype.
"""


import torch
import triton
import triton.language as tl

from ._compile import TRITON_POINTER_TYPES, CompileTarget, specialized_target
from ._launch import programs_per_device

MAX_HIDDEN = 16384


@triton.jit
def _uniform(draw):
    """A 32-bit Philox draw -> float in [0, 1), as tl.rand converts it."""
    draw = draw.to(tl.int32, bitcast=True)
    return tl.where(draw < 0, ~draw, draw).to(tl.float32) * 4.6566127342e-10


@triton.jit
def philox_keep_mask(rows, dropout_p, seed, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout keep-mask of a (BLOCK_M, BLOCK_N) tile of rows `rows` and columns 0..BLOCK_N-1 (module docstring:
    one Philox call per four columns). Shared with kernels/embeddings.py, whose dropout follows the same scheme."""
    groups = tl.arange(0, BLOCK_N // 4)  # columns 4g..4g+3 share one Philox call
    # Counters (offset + column group, row) stay 32-bit: a flat offset + row * n_cols needed 64-bit arithmetic,
    # which cost the backward 8 bytes of stack on sm_90a.
    zero = tl.zeros((BLOCK_M, BLOCK_N // 4), dtype=tl.int32)
    r0, r1, r2, r3 = tl.philox(seed, zero + offset + groups[None, :], zero + rows[:, None].to(tl.int32), zero, zero)
    return tl.reshape(tl.join(tl.join(_uniform(r0) >= dropout_p, _uniform(r1) >= dropout_p),
                              tl.join(_uniform(r2) >= dropout_p, _uniform(r3) >= dropout_p)), (BLOCK_M, BLOCK_N))


@triton.jit
def _h_and_keep(
    x_ptr, res_ptr, rows, cols, tile_ok, n_cols, stride_xm, stride_rm, dropout_p, seed, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h = dropout(x) + residual in fp32 for a (BLOCK_M, BLOCK_N) tile, and the keep-mask (forward and backward)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    keep = tile_ok
    if HAS_DROPOUT:
        keep = philox_keep_mask(rows, dropout_p, seed, offset, BLOCK_M, BLOCK_N)
        x = tl.where(keep, x / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return x, keep


# seed and offset change every call: unspecialised, so that one compiled kernel serves them all (and the compile check
# compiles exactly that kernel).
@triton.jit(do_not_specialize=["seed", "offset"])
def _dropout_add_ln_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, mask_ptr,
    n_rows, n_cols, stride_xm, stride_rm, stride_ym, eps, dropout_p, seed, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows * n_cols > 2**31
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    h, keep = _h_and_keep(x_ptr, res_ptr, rows, cols, tile_ok, n_cols, stride_xm, stride_rm, dropout_p, seed, offset,
                          HAS_RESIDUAL, HAS_DROPOUT, BLOCK_M, BLOCK_N)  # (BLOCK_M, BLOCK_N) fp32, zero outside the tile

    mean = tl.sum(h, axis=1) / n_cols
    centered = tl.where(tile_ok, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if STORE_MASK:
        tl.store(mask_ptr + rows[:, None] * n_cols + cols[None, :], keep.to(tl.uint8), mask=tile_ok)


@triton.jit(do_not_specialize=["seed", "offset"])
def _dropout_add_ln_bwd_kernel(
    dy_ptr, x_ptr, res_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, partial_dw_ptr, partial_db_ptr,
    n_rows, n_cols, rows_per_program, stride_dym, stride_xm, stride_rm, dropout_p, seed, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program owns `rows_per_program` rows; dx and dres are contiguous (n_rows, n_cols).
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first_row = group * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    for r0 in range(first_row, last_row, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < last_row
        tile_ok = row_ok[:, None] & col_ok[None, :]
        h, keep = _h_and_keep(x_ptr, res_ptr, rows, cols, tile_ok, n_cols, stride_xm, stride_rm, dropout_p, seed,
                              offset, HAS_RESIDUAL, HAS_DROPOUT, BLOCK_M, BLOCK_N)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(tile_ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        wdy = dy * w
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        dh = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        out_offsets = rows[:, None] * n_cols + cols[None, :]
        if HAS_RESIDUAL:
            tl.store(dres_ptr + out_offsets, dh.to(dres_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_DROPOUT:
            dh = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
        tl.store(dx_ptr + out_offsets, dh.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_WEIGHT:
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
    if HAS_WEIGHT:
        tl.store(partial_dw_ptr + group * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(partial_db_ptr + group * n_cols + cols, tl.sum(db, axis=0), mask=col_ok)


def launch_config(n_cols: int, backward: bool) -> dict[str, int]:
    """A row block of ~4K elements: 32 per thread in the forward (4 warps), 16 in the backward (8 warps), more warps
    for rows wider than 4096.

    The backward at 32 elements per thread compiled to 243-255 registers (two blocks per SM, too few warps in flight
    for a memory-bound kernel); the forward at 16 per thread put 8 bytes on the stack for fp16 without residual
    (2026-11-22, sm_90a, triton 3.9). Both checked by the compile check.
    """
    block_n = max(4, triton.next_power_of_2(n_cols))  # dropout takes four columns per Philox call
    block_m = max(1, 4096 // block_n)
    per_thread = 16 if backward else 32
    return {"BLOCK_N": block_n, "BLOCK_M": block_m,
            "num_warps": min(16, max(4, block_m * block_n // (32 * per_thread))), "num_stages": 1}



def dropout_add_layer_norm_forward(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, dropout_p: float, seed: int, offset: int, store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (rows, N) with unit column stride -> (y (rows, N), mean, rstd (rows,) fp32, keep-mask uint8
    (rows, N) if `store_mask` else empty)."""
    n_rows, n_cols = x.shape
    config = launch_config(n_cols, backward=False)
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    mean = torch.empty((n_rows,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    mask = torch.empty((n_rows, n_cols) if store_mask else (0,), device=x.device, dtype=torch.uint8)
    if n_rows > 0:
        _dropout_add_ln_fwd_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](
            x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, y, mean, rstd, mask,
            n_rows, n_cols, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            eps, dropout_p, seed, offset,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, STORE_MASK=store_mask, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return y, mean, rstd, mask


def dropout_add_layer_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
    bias_dtype: torch.dtype | None, mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float, seed: int, offset: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """grad_y (rows, N) with unit column stride -> (d_x, d_residual or None, d_weight or None, d_bias or None), d_x
    and d_residual in x's dtype, d_weight in weight's, d_bias in `bias_dtype` (None: no bias)."""
    has_bias = bias_dtype is not None
    n_rows, n_cols = x.shape
    config = launch_config(n_cols, backward=True)
    rows_per_program = triton.cdiv(max(n_rows, 1), programs_per_device(x.device))
    rows_per_program = triton.cdiv(rows_per_program, config["BLOCK_M"]) * config["BLOCK_M"]
    n_groups = max(1, triton.cdiv(n_rows, rows_per_program))
    dx = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    dres = torch.empty_like(dx) if residual is not None else None
    partials = torch.zeros((2, n_groups, n_cols), device=x.device, dtype=torch.float32)
    if n_rows > 0:
        _dropout_add_ln_bwd_kernel[(n_groups,)](
            grad_y, x, residual if residual is not None else x, weight if weight is not None else x, mean, rstd,
            dx, dres if dres is not None else dx, partials[0], partials[1],
            n_rows, n_cols, rows_per_program, grad_y.stride(0), x.stride(0),
            residual.stride(0) if residual is not None else 0, dropout_p, seed, offset,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0, HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    dw = partials[0].sum(dim=0).to(weight.dtype) if weight is not None else None
    db = partials[1].sum(dim=0).to(bias_dtype) if has_bias else None
    return dx, dres, dw, db


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """Every configuration launched for the presets' hidden and embedding sizes: with and without residual and
    dropout (and the debug mask store), affine LayerNorm as ELECTRA's, for each dtype, and for fp16/bf16 activations
    with fp32 weight and bias (the residual stream under autocast)."""
    sizes = sorted({m["hidden_size"] for m in models} | {m["embedding_size"] for m in models})
    targets = []
    for n_cols in sizes:
        fwd, bwd = launch_config(n_cols, backward=False), launch_config(n_cols, backward=True)
        blocks = {"BLOCK_M": fwd["BLOCK_M"], "BLOCK_N": fwd["BLOCK_N"]}  # the same in both passes
        ints = {"n_rows": 16384, "n_cols": n_cols, "rows_per_program": 64, "stride_xm": n_cols, "stride_rm": n_cols,
                "stride_ym": n_cols, "stride_dym": n_cols, "seed": 12345, "offset": 678}
        scalars = {"eps": "fp32", "dropout_p": "fp32"}
        fwd_launch, bwd_launch = ({"num_warps": c["num_warps"], "num_stages": c["num_stages"],
                                   "multiplies_matrices": False} for c in (fwd, bwd))
        layouts = [(p, p) for p in TRITON_POINTER_TYPES.values()] + [("*fp16", "*fp32"), ("*bf16", "*fp32")]
        for pointer, param_pointer in layouts:  # (activations, weight and bias)
            pointers = {
                **dict.fromkeys(["x_ptr", "res_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dres_ptr"], pointer),
                **dict.fromkeys(["w_ptr", "b_ptr"], param_pointer),
                **dict.fromkeys(["mean_ptr", "rstd_ptr", "partial_dw_ptr", "partial_db_ptr"], "*fp32"),
                "mask_ptr": "*u8",
            }
            params = "" if param_pointer == pointer else f" params={param_pointer[1:]}"
            for residual in (True, False):
                for dropout in (False, True):
                    flags = {"HAS_RESIDUAL": residual, "HAS_DROPOUT": dropout, "HAS_WEIGHT": True, "HAS_BIAS": True}
                    what = f"N={n_cols} {pointer[1:]}{params} residual={residual} dropout={dropout}"
                    for store_mask in (False, True) if dropout else (False,):
                        targets.append(specialized_target(
                            _dropout_add_ln_fwd_kernel, pointers=pointers, ints=ints, scalars=scalars,
                            constexprs={**flags, "STORE_MASK": store_mask, **blocks},
                            label=what + (" mask" if store_mask else ""), **fwd_launch,
                        ))
                    targets.append(specialized_target(
                        _dropout_add_ln_bwd_kernel, pointers=pointers, ints=ints, scalars=scalars,
                        constexprs={**flags, **blocks}, label=what, **bwd_launch,
                    ))
    return targets
