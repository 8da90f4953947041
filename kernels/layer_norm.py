"""Fused bias + dropout + residual add + LayerNorm: y = LayerNorm(dropout(x + x_bias) + residual) over the last dim,
with its backward (x_bias: the bias of the linear layer that produced x, left out of its GEMM, as Megatron's
bias-dropout-add).

Forward: one pass per block of rows (BLOCK_M rows x the whole hidden dim in registers): x_bias is added in fp32, the
dropout keep-mask comes from Philox, all four 32-bit outputs of each call used (counters (offset + col / 4, row, 0, 0)
for columns col..col+3: a quarter of the calls of one `tl.rand` per element), an element is kept when its uniform
draw is >= p, kept elements are scaled by 1 / (1 - p), the residual is added,
mean and variance are taken in fp32, and y, mean and rstd (fp32, per row) are written. Neither the mask nor the sum
h = dropout(x + x_bias) + residual is stored: the backward regenerates the mask from the same seed and recomputes h
from x, x_bias and the residual, which autograd keeps alive anyway (the same traffic as storing h, without its
memory). A debug flag also writes the keep-mask (uint8) so that tests can compare against a reference applying the
same mask.

Backward: one pass per row block for d_h = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)), writing d_residual =
d_h and d_x = d_h * keep / (1 - p); each program accumulates d_weight = sum(dy * xhat), d_bias = sum(dy) and
d_x_bias = sum(d_x) (in fp32, before d_x is rounded to its dtype) over its rows into fp32 partials, summed by the
launcher in a fixed order (deterministic, no atomics). The linear layer's backward then needs no
column sum of its own.

Variants by constexpr: no x_bias, no residual (the embeddings' LayerNorm), no dropout, no weight and/or no bias
(elementwise_affine=False). Any number of rows, any hidden size up to 16384 (one row block must fit in registers),
rows of any stride with unit stride along the hidden dim (the op makes other layouts contiguous). fp32, fp16, bf16
inputs, fp32 statistics; output, d_x and d_residual in the input dtype. Weight, bias and x_bias may be fp32 while x
and the residual are fp16/bf16 (a 16-bit residual stream with fp32 parameters, as under autocast): they are read as
fp32 either way, and their gradients come back in their own dtype.
"""


import torch
import triton
import triton.language as tl

from ._compile import TRITON_POINTER_TYPES, CompileTarget, row_pass_targets
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
    x_ptr, x_bias, res_ptr, rows, cols, tile_ok, n_cols, stride_xm, stride_rm, dropout_p, seed, offset,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """h = dropout(x + x_bias) + residual in fp32 for a (BLOCK_M, BLOCK_N) tile, and the keep-mask (forward and
    backward). x_bias: the (BLOCK_N,) fp32 row vector, loaded once per program by the caller."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        x += x_bias[None, :]
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
    x_ptr, xb_ptr, res_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, mask_ptr,
    n_rows, n_cols, stride_xm, stride_rm, stride_ym, eps, dropout_p, seed, offset,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows * n_cols > 2**31
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x_bias = tl.load(xb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_X_BIAS else 0.0
    h, keep = _h_and_keep(x_ptr, x_bias, res_ptr, rows, cols, tile_ok, n_cols, stride_xm, stride_rm, dropout_p, seed,
                          offset, HAS_X_BIAS, HAS_RESIDUAL, HAS_DROPOUT, BLOCK_M, BLOCK_N)
    # h: (BLOCK_M, BLOCK_N) fp32, zero in the columns past n_cols (x and x_bias are loaded masked there), as the row
    # statistics below need.

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
    dy_ptr, x_ptr, xb_ptr, res_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, partial_dw_ptr, partial_db_ptr,
    partial_dxb_ptr, n_rows, n_cols, rows_per_program, stride_dym, stride_xm, stride_rm, dropout_p, seed, offset,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program owns `rows_per_program` rows; dx and dres are contiguous (n_rows, n_cols).
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
    x_bias = tl.load(xb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_X_BIAS else 0.0
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dxb = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first_row = group * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    for r0 in range(first_row, last_row, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < last_row
        tile_ok = row_ok[:, None] & col_ok[None, :]
        h, keep = _h_and_keep(x_ptr, x_bias, res_ptr, rows, cols, tile_ok, n_cols, stride_xm, stride_rm, dropout_p,
                              seed, offset, HAS_X_BIAS, HAS_RESIDUAL, HAS_DROPOUT, BLOCK_M, BLOCK_N)
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
        if HAS_X_BIAS:
            dxb += dh  # columns past n_cols hold garbage (dh = -c2 * rstd there), dropped by the store's mask
        if HAS_WEIGHT:
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
    if HAS_WEIGHT:
        tl.store(partial_dw_ptr + group * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(partial_db_ptr + group * n_cols + cols, tl.sum(db, axis=0), mask=col_ok)
    if HAS_X_BIAS:
        tl.store(partial_dxb_ptr + group * n_cols + cols, tl.sum(dxb, axis=0), mask=col_ok)


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
    x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float, dropout_p: float, seed: int, offset: int, store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (rows, N) with unit column stride, x_bias (N,) -> (y (rows, N), mean, rstd (rows,) fp32, keep-mask
    uint8 (rows, N) if `store_mask` else empty)."""
    n_rows, n_cols = x.shape
    config = launch_config(n_cols, backward=False)
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    mean = torch.empty((n_rows,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    mask = torch.empty((n_rows, n_cols) if store_mask else (0,), device=x.device, dtype=torch.uint8)
    if n_rows > 0:
        _dropout_add_ln_fwd_kernel[(triton.cdiv(n_rows, config["BLOCK_M"]),)](
            x, x_bias if x_bias is not None else x, residual if residual is not None else x,
            weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd, mask,
            n_rows, n_cols, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            eps, dropout_p, seed, offset,
            HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, STORE_MASK=store_mask,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return y, mean, rstd, mask


def dropout_add_layer_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None,
    weight: torch.Tensor | None, bias_dtype: torch.dtype | None, mean: torch.Tensor, rstd: torch.Tensor,
    dropout_p: float, seed: int, offset: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """grad_y (rows, N) with unit column stride -> (d_x, d_x_bias, d_residual, d_weight, d_bias), each None when its
    input is (bias: `bias_dtype` None); d_x and d_residual in x's dtype, d_x_bias, d_weight and d_bias in their
    input's dtype (d_bias in `bias_dtype`).

    Launches: the row kernel, then one small column sum over the programs' partials per parameter gradient (separate
    sums: custom ops may not return views of one buffer). The partials need no zero fill: every program writes its
    row of each."""
    n_rows, n_cols = x.shape
    config = launch_config(n_cols, backward=True)
    rows_per_program = triton.cdiv(max(n_rows, 1), programs_per_device(x.device))
    rows_per_program = triton.cdiv(rows_per_program, config["BLOCK_M"]) * config["BLOCK_M"]
    n_groups = max(1, triton.cdiv(n_rows, rows_per_program))
    dx = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    dres = torch.empty_like(dx) if residual is not None else None
    # d_weight, d_bias, d_x_bias: the dtype of each wanted column sum, None for those not wanted.
    sum_dtypes = [None if weight is None else weight.dtype, bias_dtype, None if x_bias is None else x_bias.dtype]
    wanted = sum(dtype is not None for dtype in sum_dtypes)
    partials = (torch.empty if n_rows > 0 else torch.zeros)(
        (wanted, n_groups, n_cols), device=x.device, dtype=torch.float32)
    slabs = iter(partials)
    slab_of = [next(slabs) if dtype is not None else None for dtype in sum_dtypes]
    # mean stands in for the partials not wanted: any fp32 buffer, never written with its flag off.
    partial_ptrs = [slab if slab is not None else mean for slab in slab_of]
    if n_rows > 0:
        _dropout_add_ln_bwd_kernel[(n_groups,)](
            grad_y, x, x_bias if x_bias is not None else x, residual if residual is not None else x,
            weight if weight is not None else x, mean, rstd, dx, dres if dres is not None else dx, *partial_ptrs,
            n_rows, n_cols, rows_per_program, grad_y.stride(0), x.stride(0),
            residual.stride(0) if residual is not None else 0, dropout_p, seed, offset,
            HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias_dtype is not None,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    dw, db, dxb = (slab.sum(dim=0).to(dtype) if slab is not None else None for slab, dtype in zip(slab_of, sum_dtypes))
    return dx, dxb, dres, dw, db


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """Every configuration launched for the presets' hidden and embedding sizes: with and without residual and
    dropout (and the debug mask store), affine LayerNorm as ELECTRA's, for each dtype, and for fp16/bf16 activations
    with fp32 weight and bias (the residual stream under autocast); with x_bias as the encoder's output layers train
    under autocast (hidden sizes, residual, dropout, fp32 x_bias)."""
    hidden_sizes = {m["hidden_size"] for m in models}
    sizes = sorted(hidden_sizes | {m["embedding_size"] for m in models})
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
                **dict.fromkeys(["xb_ptr", "w_ptr", "b_ptr"], param_pointer),
                **dict.fromkeys(["mean_ptr", "rstd_ptr", "partial_dw_ptr", "partial_db_ptr", "partial_dxb_ptr"],
                                "*fp32"),
                "mask_ptr": "*u8",
            }
            params = "" if param_pointer == pointer else f" params={param_pointer[1:]}"
            variants = [(residual, dropout, False) for residual in (True, False) for dropout in (False, True)]
            if params and n_cols in hidden_sizes:
                variants.append((True, True, True))
            for residual, dropout, x_bias in variants:
                flags = {"HAS_X_BIAS": x_bias, "HAS_RESIDUAL": residual, "HAS_DROPOUT": dropout, "HAS_WEIGHT": True,
                         "HAS_BIAS": True}
                what = f"N={n_cols} {pointer[1:]}{params} residual={residual} dropout={dropout}"
                what += " x_bias" if x_bias else ""
                store_masks = (False, True) if dropout and not x_bias else (False,)
                targets += row_pass_targets(
                    _dropout_add_ln_fwd_kernel, _dropout_add_ln_bwd_kernel, pointers=pointers, ints=ints,
                    scalars=scalars, constexprs={**flags, **blocks}, store_masks=store_masks, label=what,
                    forward_launch=fwd_launch, backward_launch=bwd_launch)
    return targets
