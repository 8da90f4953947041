"""Fused GELU-linear: Y = gelu(X @ W^T + b), exact (erf) or tanh GELU, with its backward.

One GEMM kernel (`_matmul_kernel`) serves all three products, C = A @ B with A and B given by arbitrary strides:

    forward   Y  = gelu(X @ W^T + b)   A = X (M, K),      B = W^T (K, N) (strides of W swapped)
    backward  dX = dZ @ W              A = dZ (M, N),     B = W (N, K)
              dW = dZ^T @ X            A = dZ^T (N, M),   B = X (M, K)

fp32 accumulation always; bias, GELU and the optional store of the pre-activation Z = X @ W^T + b in the epilogue
(Y = gelu of the fp32 accumulator, so Y is rounded once). Grouped (GROUP_M) program ordering keeps the A row panels
of neighbouring programs in L2. `tl.dot` with pipelined loads (num_stages 3-4) compiles to HGMMA (wgmma) on sm_90a and
to HMMA on sm_80. Any M, N, K: edges are masked, K need not be a multiple of 16 (the last K step is masked to zero).
dW may be split along its reduction dimension (the M tokens) into fp32 partials of weight size, summed in a fixed
order by the launcher (deterministic, no atomics), so that it fills the GPU when N x K gives few tiles.

Backward design, decided as follows (2026-11-22; not yet measured on a GPU, see the issue's closing note):
- Z is saved by the forward (one extra M x N store in the activation dtype, the same memory eager PyTorch keeps for
  F.gelu's backward) rather than recomputed, which would cost a third GEMM in the backward.
- dZ = dY * gelu'(Z) is computed by one fused elementwise pass (`_gelu_grad_kernel`) that also reduces dBias into
  per-program fp32 partials, writing dZ once in the activation dtype (no full-size fp32 buffer). The two backward GEMMs
  then consume dZ through the plain pipelined shared-memory path. The alternative, a prologue recomputing gelu'(Z) on
  every A tile, would evaluate erf/exp N/BLOCK_N times per element in the dX GEMM and M/BLOCK_M... times in the dW GEMM,
  move the A operand through registers (register-operand wgmma, which Triton pipelines worse than shared-memory
  operands), and still need a separate reduction for dBias. The elementwise pass costs 2 reads + 1 write of M x N,
  about what eager's gelu backward alone costs, and eager then re-reads dZ for the bias.
- TMA / tensor-descriptor loads are not used: they need a host-side allocator and 16-byte aligned strides (K = 40 in
  fp16 is, K = 37 is not), and plain pipelined loads compile to the same HGMMA main loop on both triton 3.6 and 3.9.

fp32 inputs multiply with input_precision="tf32x3" (three tf32 products; tensor cores, ~fp32 accuracy), matching
PyTorch's default of no TF32 for float32 matmuls to ~1e-6 relative. Not supported: integer or mixed dtypes (the op
checks), fp8.
"""

import dataclasses
import itertools

import torch
import triton
import triton.language as tl

from ._compile import TRITON_POINTER_TYPES, CompileTarget, specialized_target
from ._launch import programs_per_device

ACTIVATIONS = {"none": 1, "tanh": 2}  # F.gelu's `approximate` -> the kernels' ACTIVATION (0 = identity)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)
_SM_COUNT = 132  # H100 SXM / H200: the launch configs' notion of "fills the GPU" (a fixed number keeps them pure)


# Products below keep the tensor on the left of these constexprs: the interpreter turns `constexpr * tensor` into a
# constexpr wrapping a tensor, which tl.exp rejects (2026-11-22, triton 3.9).
@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates to +-1 without overflow; no tanh in tl.math on triton 3.6.
    return 1.0 - 2.0 / (tl.exp(u * 2.0) + 1.0)


@triton.jit
def _tanh_arg(z):
    return (z + z * z * z * _TANH_CUBIC) * _SQRT_2_OVER_PI


@triton.jit
def _gelu(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return z * 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF))
    return z * 0.5 * (1.0 + _tanh(_tanh_arg(z)))


@triton.jit
def _gelu_grad(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return (1.0 + tl.math.erf(z * _SQRT_HALF)) * 0.5 + z * _INV_SQRT_2PI * tl.exp(z * z * -0.5)
    t = _tanh(_tanh_arg(z))
    return (1.0 + t) * 0.5 + z * 0.5 * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _TANH_CUBIC))


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, z_ptr,
    M, N, K, k_per_split,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EPILOGUE_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grid: (output tiles, K splits). C[split] (M, N) = A[:, split's K range] @ B[split's K range, :].
    pid, split = tl.program_id(0), tl.program_id(1)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row panels of A are swept together, so consecutive programs reuse them from L2.
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows/columns re-read valid ones (their results are never stored): only the K edge needs a load mask.
    # int64: M * stride_am may exceed 2**31.
    safe_rows = (rows % M).to(tl.int64)
    safe_cols = (cols % N).to(tl.int64)
    k_start = split * k_per_split
    k_len = tl.minimum(k_per_split, K - k_start)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + safe_rows[:, None] * stride_am + (k_start + offs_k)[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + (k_start + offs_k)[:, None].to(tl.int64) * stride_bk + safe_cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_len, BLOCK_K):
        k_ok = offs_k < k_len - k
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_cols).to(tl.float32)[None, :]
    # A 64-bit tile base and 32-bit offsets inside the tile: per-element int64 offsets cost registers.
    c_base = split * stride_cs + (pid_m * BLOCK_M).to(tl.int64) * stride_cm + (pid_n * BLOCK_N).to(tl.int64) * stride_cn
    # The epilogue of a 128 x 256 tile in one piece needs more than 255 registers per thread with GELU (the whole
    # tile's elementwise math is scheduled at once, and spills): it runs on 2**EPILOGUE_SPLITS column slices of the
    # accumulator instead. Slicing splits a register dimension of the wgmma accumulator layout, so no data moves
    # (2026-11-22, triton 3.9: erf needs quarters, tanh halves; checked by the compile check).
    row0, col0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    if EPILOGUE_SPLITS == 0:
        _epilogue(acc, z_ptr, c_ptr, c_base, row0, col0, M, N, stride_cm, stride_cn, ACTIVATION, STORE_Z,
                  BLOCK_M, BLOCK_N)
    elif EPILOGUE_SPLITS == 1:
        HALF: tl.constexpr = BLOCK_N // 2
        lo, hi = _column_halves(acc, BLOCK_M, BLOCK_N)
        _epilogue(lo, z_ptr, c_ptr, c_base, row0, col0, M, N, stride_cm, stride_cn, ACTIVATION, STORE_Z,
                  BLOCK_M, HALF)
        _epilogue(hi, z_ptr, c_ptr, c_base + HALF * stride_cn, row0, col0 + HALF, M, N, stride_cm, stride_cn,
                  ACTIVATION, STORE_Z, BLOCK_M, HALF)
    else:
        QUARTER: tl.constexpr = BLOCK_N // 4
        lo, hi = _column_halves(acc, BLOCK_M, BLOCK_N)
        q0, q1 = _column_halves(lo, BLOCK_M, BLOCK_N // 2)
        q2, q3 = _column_halves(hi, BLOCK_M, BLOCK_N // 2)
        _epilogue(q0, z_ptr, c_ptr, c_base, row0, col0, M, N, stride_cm, stride_cn, ACTIVATION, STORE_Z,
                  BLOCK_M, QUARTER)
        _epilogue(q1, z_ptr, c_ptr, c_base + QUARTER * stride_cn, row0, col0 + QUARTER, M, N, stride_cm, stride_cn,
                  ACTIVATION, STORE_Z, BLOCK_M, QUARTER)
        _epilogue(q2, z_ptr, c_ptr, c_base + 2 * QUARTER * stride_cn, row0, col0 + 2 * QUARTER, M, N, stride_cm,
                  stride_cn, ACTIVATION, STORE_Z, BLOCK_M, QUARTER)
        _epilogue(q3, z_ptr, c_ptr, c_base + 3 * QUARTER * stride_cn, row0, col0 + 3 * QUARTER, M, N, stride_cm,
                  stride_cn, ACTIVATION, STORE_Z, BLOCK_M, QUARTER)


@triton.jit
def _column_halves(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) -> its columns [0, BLOCK_N / 2) and [BLOCK_N / 2, BLOCK_N)."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(
    acc, z_ptr, c_ptr, c_base, row0, col0, M, N, stride_cm, stride_cn,
    ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Store Z = acc (optional) and C = gelu(acc) for the (BLOCK_M, BLOCK_N) tile at (row0, col0); C's offset c_base."""
    local_rows, local_cols = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    offsets = local_rows[:, None] * stride_cm + local_cols[None, :] * stride_cn
    mask = ((row0 + local_rows) < M)[:, None] & ((col0 + local_cols) < N)[None, :]
    if STORE_Z:
        tl.store(z_ptr + c_base + offsets, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if ACTIVATION != 0:
        acc = _gelu(acc, ACTIVATION)
    tl.store(c_ptr + c_base + offsets, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_grad_kernel(
    dy_ptr, z_ptr, dz_ptr, partial_db_ptr,
    M, N, rows_per_program, stride_dym, stride_dyn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (row groups, column chunks); dz = dy * gelu'(z) over (rows_per_program, BLOCK_N), and that block's dbias
    # partial kept in registers across its rows. z and dz are contiguous (M, N).
    group, chunk = tl.program_id(0), tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    first_row = group * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(first_row, last_row, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        tile_ok = (rows < last_row)[:, None] & col_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=tile_ok, other=0.0)
        z = tl.load(z_ptr + rows[:, None] * N + cols[None, :], mask=tile_ok, other=0.0)
        dz = dy.to(tl.float32) * _gelu_grad(z.to(tl.float32), ACTIVATION)
        tl.store(dz_ptr + rows[:, None] * N + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_BIAS:
            db += dz
    if HAS_BIAS:
        tl.store(partial_db_ptr + group * N + cols, tl.sum(db, axis=0), mask=col_ok)


def device_arch(device: torch.device) -> int:
    """90 for Hopper and newer, 80 for Ampere/Ada, 0 for the interpreter: the key of the launch configs."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def matmul_config(
    M: int, N: int, K: int, dtype: torch.dtype, arch: int, activation: int = 0, has_bias: bool = False,
    store_z: bool = False,
) -> dict[str, int]:
    """Tiles, warps, stages, epilogue slicing and K splits of C (M, N) = A (M, K) @ B (K, N) with the given epilogue:
    a pure function of its arguments.

    No runtime autotuning, so that the compile check covers exactly what is launched. The interpreter (arch 0) gets
    small tiles so that tests exercise several tiles, K steps, masked edges and the split path at tiny sizes.
    """
    epilogue = activation != 0 or has_bias or store_z
    if arch == 0:
        config = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    elif dtype == torch.float32:
        # tf32x3 keeps three operand copies live: 128 x 128 x 32 with 8 warps stays clear of spills on sm_90a, but
        # with the GELU epilogue spilled ~400 bytes on sm_80 (mma.sync holds operands in registers; 2026-11-22).
        block_m = 128 if arch == 90 else 64
        config = {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    else:
        # 128 x 256 tiles when they still give two waves on 132 SMs, else 128 x 128 (more tiles, better balance).
        # The exact-GELU epilogue that also stores Z spills at 128 x 256 even in column slices (2026-11-22, triton
        # 3.9: 48 bytes), so that one (the training forward) stays at 128 x 128.
        wide = (N >= 256 and triton.cdiv(M, 128) * triton.cdiv(N, 256) >= 2 * _SM_COUNT
                and not (activation == 1 and store_z))
        block_k = 64 if arch == 90 else 32  # sm_80: 163 KB of shared memory per block
        config = {"BLOCK_M": 128, "BLOCK_N": 256 if wide else 128, "BLOCK_K": block_k, "num_warps": 8,
                  "num_stages": 3 if wide else 4}
    # Column slices of the epilogue (see _matmul_kernel): quarters for erf, halves for tanh, on 256-wide tiles (and in
    # the interpreter, so that tests cover the slicing).
    splits = {0: 0, 1: 2, 2: 1}[activation] if config["BLOCK_N"] == 256 or arch == 0 else 0
    tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
    # Split a long reduction when the output has too few tiles to fill the GPU (dW: N x K output, M-long reduction).
    # Not with an epilogue: bias and GELU apply to the whole sum.
    split = 1
    if not epilogue and arch != 0 and tiles < 2 * _SM_COUNT and K >= 4096:
        split = max(1, min(8, triton.cdiv(4 * _SM_COUNT, tiles), K // 1024))
    elif not epilogue and arch == 0 and K >= 128:
        split = 2
    k_per_split = triton.cdiv(triton.cdiv(K, split), config["BLOCK_K"]) * config["BLOCK_K"]
    return {**config, "GROUP_M": 8, "EPILOGUE_SPLITS": splits, "SPLIT_K": triton.cdiv(K, k_per_split) if K else 1,
            "k_per_split": k_per_split}


def _input_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # the latter is ignored for fp16/bf16 operands


def matmul(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: int = 0, store_z: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """a (M, K) @ b (K, N) [+ bias (N,)] [-> gelu] with any strides -> (C (M, N) contiguous, Z (M, N) or None)."""
    (M, K), N = a.shape, b.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    z = torch.empty((M, N), device=a.device, dtype=a.dtype) if store_z else None
    if M == 0 or N == 0:
        return out, z
    config = matmul_config(M, N, K, a.dtype, device_arch(a.device), activation, bias is not None, store_z)
    split = config["SPLIT_K"]
    target = out if split == 1 else torch.empty((split, M, N), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]), split)
    _matmul_kernel[grid](
        a, b, bias if bias is not None else a, target, z if z is not None else a,
        M, N, K, config["k_per_split"],
        *a.stride(), *b.stride(), M * N, N, 1,
        HAS_BIAS=bias is not None, ACTIVATION=activation, STORE_Z=store_z,
        INPUT_PRECISION=_input_precision(a.dtype),
        EPILOGUE_SPLITS=config["EPILOGUE_SPLITS"], BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"], num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if split > 1:  # only plain products split (no epilogue): fixed-order sum of the partials
        out.copy_(target.sum(dim=0))
    return out, z


def gelu_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int, save_z: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (M, K), weight (N, K), bias (N,) or None -> (gelu(x @ weight^T + bias) (M, N), the pre-activation or None)."""
    return matmul(x, weight.t(), bias, activation, save_z)


def grad_config(N: int) -> dict[str, int]:
    block_n = min(256, triton.next_power_of_2(N))
    return {"BLOCK_N": block_n, "BLOCK_M": max(16, 4096 // block_n), "num_warps": 8, "num_stages": 2}



def gelu_linear_backward(
    grad_y: torch.Tensor, z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, activation: int,
    needs_dx: bool, needs_dw: bool, grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """grad_y (M, N) any strides, z (M, N) contiguous, x (M, K), weight (N, K) -> (dx (M, K), dw (N, K), db (N,)).

    grad_residual (M, K): a gradient that x also receives (x was the residual stream), added to dx in the dX GEMM's
    epilogue: cuBLAS addmm with beta = 1, one pass instead of autograd's separate (M, K) add."""
    M, N = z.shape
    config = grad_config(N)
    n_chunks = triton.cdiv(N, config["BLOCK_N"])
    wanted_groups = max(1, programs_per_device(z.device) // n_chunks)
    rows_per_program = triton.cdiv(triton.cdiv(max(M, 1), wanted_groups), config["BLOCK_M"]) * config["BLOCK_M"]
    n_groups = max(1, triton.cdiv(M, rows_per_program))
    dz = torch.empty_like(z)
    partial_db = torch.zeros((n_groups, N), device=z.device, dtype=torch.float32)
    if M > 0 and N > 0:
        _gelu_grad_kernel[(n_groups, n_chunks)](
            grad_y, z, dz, partial_db, M, N, rows_per_program, *grad_y.stride(),
            ACTIVATION=activation, HAS_BIAS=has_bias, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    dx = None
    if needs_dx:
        dx = matmul(dz, weight)[0] if grad_residual is None else torch.addmm(grad_residual, dz, weight)
    dw = matmul(dz.t(), x)[0].to(weight.dtype) if needs_dw else None
    db = partial_db.sum(dim=0).to(weight.dtype) if has_bias else None
    return dx, dw, db


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """Every GEMM configuration launched on `arch` ("sm_90a" or "sm_80") for the presets' FFN and head shapes at
    M = B*L in 4k..32k, plus the gelu-grad pass; deduplicated, a label names the (K, N) shapes that launch it.

    Forward: exact and tanh GELU, bias, with and without storing Z. Backward: dX (A = dZ row-major, B = W row-major)
    and dW (A = dZ^T column-major, B = X row-major, split along M into fp32 partials when the output has few tiles).
    """
    shapes = set()
    for m in models:
        hidden, inner = m["hidden_size"], m["intermediate_size"]
        # FFN up and down projections, the discriminator head's dense, the generator head's hidden -> embedding.
        shapes |= {(hidden, inner), (inner, hidden), (hidden, hidden), (hidden, m["embedding_size"])}
    plain = {"HAS_BIAS": False, "ACTIVATION": 0, "STORE_Z": False}
    capability = {"sm_90a": 90, "sm_80": 80}[arch]
    found: dict[tuple, dict] = {}
    for dtype, pointer in TRITON_POINTER_TYPES.items():
        for (K, N), M in itertools.product(sorted(shapes), (4096, 8192, 16384, 32768)):
            launches = [("fwd", M, N, K, (K, 1), (1, K), {"HAS_BIAS": True, "ACTIVATION": act, "STORE_Z": z})
                        for act in (1, 2) for z in (False, True)]
            launches += [("dX", M, K, N, (N, 1), (K, 1), plain), ("dW", N, K, M, (1, N), (K, 1), plain)]
            for kind, m_, n_, k_, a_strides, b_strides, flags in launches:
                config = matmul_config(m_, n_, k_, dtype, capability, flags["ACTIVATION"], flags["HAS_BIAS"],
                                       flags["STORE_Z"])
                blocks = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPILOGUE_SPLITS")}
                split = config["SPLIT_K"] > 1
                key = (kind, pointer, *blocks.values(), config["num_warps"], config["num_stages"], split,
                       *flags.values())
                entry = found.setdefault(key, {"shapes": set(), "target": None})
                entry["shapes"].add(f"{K}x{N}")
                if entry["target"] is None:
                    ints = {"M": m_, "N": n_, "K": k_, "k_per_split": config["k_per_split"],
                            "stride_am": a_strides[0], "stride_ak": a_strides[1], "stride_bk": b_strides[0],
                            "stride_bn": b_strides[1], "stride_cs": m_ * n_, "stride_cm": n_, "stride_cn": 1}
                    activation = {0: "", 1: " gelu", 2: " gelu_tanh"}[flags["ACTIVATION"]]
                    entry["what"] = (f"{kind}{activation}{' +z' if flags['STORE_Z'] else ''} {pointer[1:]} "
                                     f"{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']} "
                                     f"w{config['num_warps']}s{config['num_stages']}{' splitK' if split else ''}")
                    entry["target"] = specialized_target(
                        _matmul_kernel, ints=ints, pointers={
                            "a_ptr": pointer, "b_ptr": pointer, "bias_ptr": pointer, "z_ptr": pointer,
                            "c_ptr": "*fp32" if split else pointer},
                        constexprs={**flags, "INPUT_PRECISION": _input_precision(dtype), **blocks},
                        num_warps=config["num_warps"], num_stages=config["num_stages"], multiplies_matrices=True,
                        label="")
    targets = [dataclasses.replace(entry["target"], label=f"{entry['what']} {len(entry['shapes'])} KxN")
               for entry in found.values()]

    grad_configs = {}  # the gelu-grad pass on each forward output width, deduplicated by tile shape
    for N in sorted({n for _, n in shapes}):
        grad_configs.setdefault(tuple(grad_config(N).items()), []).append(N)
    for items, widths in grad_configs.items():
        config = dict(items)
        blocks = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
        for pointer in TRITON_POINTER_TYPES.values():
            for activation in (1, 2):
                targets.append(specialized_target(
                    _gelu_grad_kernel,
                    pointers={"dy_ptr": pointer, "z_ptr": pointer, "dz_ptr": pointer, "partial_db_ptr": "*fp32"},
                    ints={"M": 16384, "N": widths[0], "rows_per_program": 512, "stride_dym": widths[0],
                          "stride_dyn": 1},
                    constexprs={"ACTIVATION": activation, "HAS_BIAS": True, **blocks},
                    num_warps=config["num_warps"], num_stages=config["num_stages"], multiplies_matrices=False,
                    label=f"N={','.join(map(str, widths))} {pointer[1:]} {'gelu' if activation == 1 else 'gelu_tanh'}",
                ))
    return targets
