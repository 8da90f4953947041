"""Fused multi-head attention, FlashAttention-2 style: non-causal, key-padding mask, dropout, packed (varlen) batches.

For q, k, v (B, H, L, D) of any strides (or packed (total, H, D) with int32 cu_seqlens (B+1,) and max_seqlen) computes

    out = dropout(softmax(scale * q @ k^T + key_bias)) @ v

where key_bias is 0 for real keys and -inf for masked ones (mask (B, L), nonzero = real token, any pattern: right or
left padding, holes). A query row whose keys are all masked gives zeros and zero gradients, never NaN.

Forward (`_attn_fwd_kernel`): one program per (query block, batch * head); online softmax over key tiles in fp32 in
the exp2 domain; never materialises L x L. Saves only the output and the row log-sum-exp (log2 domain, of the scaled
scores; +inf for fully masked rows so that the backward's probabilities are exactly 0 there).

Backward: `_attn_bwd_preprocess_kernel` computes delta = rowsum(dO * O) (fp32); `_attn_bwd_dkdv_kernel` owns a key
block and accumulates dK, dV over all query blocks; `_attn_bwd_dq_kernel` owns a query block and accumulates dQ over
all key blocks. dQ has its own pass instead of fp32 atomics from the dK/dV pass: it costs 7 block matmuls per tile
pair instead of 5, but it is deterministic, needs no fp32 dQ buffer (zeroing + a conversion kernel) and no atomics
contention on short sequences (L = 128 gives one or two key blocks, so atomics would serialise on the same dQ rows).
Not measured against the atomic variant yet (no GPU at hand when written, 2026-11-22).

Dropout: counter-based Philox (`tl.philox`) keyed by the host-drawn seed, with 8-bit draws as FlashAttention-2: one
call returns four 32-bit words = 16 bytes, one byte per query of 16 adjacent queries of one key. Counters are
(key * max_seqlen + query / 16, batch * H + head, offset, 0), so forward, dK/dV and dQ regenerate the identical
keep-mask from position alone, whatever their tile shapes, and the forward can write that mask for tests (WRITE_KEEP,
debug only: (B, H, max_seqlen, max_seqlen) int8). The mask is built key-major, the dK/dV pass's orientation (it has
the fewest registers to spare); the forward and dQ pass transpose it. An element is kept when its byte is
>= t = min(round(p * 256), 255), i.e. with probability exactly 1 - t / 256, and kept probabilities are scaled by
1 / (1 - t / 256): the expectation is exact for the quantised probability p' = t / 256 (p is rounded to a multiple of
1/256, at most 1/512 away; p < 1/512 drops nothing). This costs a sixteenth of the Philox calls of one 32-bit draw
per element, and the generator's state lives on a (BLOCK_N, BLOCK_M / 16) tile.

Varlen (VARLEN=True) is the same kernels: the batch offset comes from cu_seqlens instead of a batch stride, and
programs past a sequence's end exit at once.

Supports head dims 32, 64 and 128 (HEAD_DIM is the tile width, not masked), any L up to MAX_SEQLEN (edge tiles
masked; the dropout counter key * L + query / 16 is int32), fp32, fp16 and bf16 with fp32 accumulation always.
fp32 uses IEEE fp32 for tl.dot, not tf32: fp32 results match a float64 reference to ~1e-6 relative (tf32 would give
~1e-3) at the price of running on CUDA cores; fp16/bf16 use tensor cores (HGMMA on sm_90a, HMMA on sm_80). Any
strides (a unit stride along D is what vectorises the loads). Launch configs are a deterministic function of (head
dim, L, dtype, arch) -- no autotuning -- so the compile check compiles exactly what runs. Not supported: causal
masks, arbitrary (L x L) masks or biases, q and k of different lengths, different head dims for q/k and v.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from ._compile import TRITON_POINTER_TYPES, CompileTarget, specialized_target

HEAD_DIMS = (32, 64, 128)
MAX_SEQLEN = 32768
# Integers that vary from call to call (random seeds; head count, sequence length and mask row stride of whatever
# batch comes): not specialised, else Triton compiles another variant whenever one is 1 or divisible by 16 -- a
# variant the compile check never saw. Strides of q/k/v/o stay specialised (HF layouts are multiples of 16).
_RUNTIME_SCALARS = ["seed", "philox_offset", "drop_threshold", "n_heads", "max_seqlen", "stride_mb"]


@triton.jit
def _dropout_keep_t(seed, philox_offset, bh, start_m, start_n, max_seqlen, drop_threshold,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N, BLOCK_M) keep-mask of keys start_n.. x queries start_m.. of head `bh` (start_m a multiple of 16):
    transposed, the orientation of the dK/dV pass, which has the fewest registers to spare.

    One Philox call per key and 16 queries: each of its four 32-bit words gives four of the queries a byte each (a
    fixed assignment). The generator's state lives on a sixteenth of the tile.
    """
    cols = start_n + tl.arange(0, BLOCK_N)
    groups = start_m // 16 + tl.arange(0, BLOCK_M // 16)
    counter = cols[:, None] * max_seqlen + groups[None, :]  # (BLOCK_N, BLOCK_M // 16)
    zero = counter * 0
    r0, r1, r2, r3 = tl.philox(seed, counter, zero + bh, zero + philox_offset, zero)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_N, BLOCK_M // 16, 4))
    shifts = 8 * tl.arange(0, 4)
    draws = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xFF  # (BLOCK_N, BLOCK_M // 16, 4, 4)
    return tl.reshape(draws, (BLOCK_N, BLOCK_M)).to(tl.int32) >= drop_threshold


@triton.jit
def _sequence(cu_seqlens_ptr, pid_bh, n_heads, max_seqlen, VARLEN: tl.constexpr):
    """(batch, head, first token of the sequence in the packed tensor, sequence length)."""
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    if VARLEN:
        first = tl.load(cu_seqlens_ptr + batch)
        seqlen = tl.load(cu_seqlens_ptr + batch + 1) - first
        seq_start = first.to(tl.int64)  # token offsets of long packed batches exceed int32 once times a stride
    else:
        seq_start = 0
        seqlen = max_seqlen
    return batch, head, seq_start, seqlen


@triton.jit
def _key_ok(mask_ptr, batch, cols, seqlen, stride_mb, stride_ml, HAS_MASK: tl.constexpr):
    ok = cols < seqlen
    if HAS_MASK:
        real = tl.load(mask_ptr + batch.to(tl.int64) * stride_mb + cols * stride_ml, mask=ok, other=0)
        ok = ok & (real != 0)
    return ok


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, cu_seqlens_ptr, keep_ptr,
    sm_scale, seed, philox_offset, drop_threshold, keep_scale,
    n_heads, max_seqlen,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_ml,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, WRITE_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    batch, head, seq_start, seqlen = _sequence(cu_seqlens_ptr, pid_bh, n_heads, max_seqlen, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seqlen:
        return
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < seqlen
    dims = tl.arange(0, HEAD_DIM)
    seq = seq_start
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh + seq * stride_ql
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh + seq * stride_kl
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh + seq * stride_vl

    q = tl.load(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # scores in the exp2 domain
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_in = cols < seqlen
        key_ok = _key_ok(mask_ptr, batch, cols, seqlen, stride_mb, stride_ml, HAS_MASK)
        k_t = tl.load(k_base + cols[None, :] * stride_kl + dims[:, None] * stride_kd, mask=col_in[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no real key so far has max -inf: shift by 0 instead, so that exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = tl.trans(_dropout_keep_t(seed, philox_offset, pid_bh, start_m, start_n, max_seqlen,
                                            drop_threshold, BLOCK_M, BLOCK_N))
            if WRITE_KEEP:
                keep_at = keep_ptr + pid_bh.to(tl.int64) * max_seqlen * max_seqlen
                tl.store(keep_at + rows[:, None] * max_seqlen + cols[None, :], keep.to(tl.int8),
                         mask=row_ok[:, None] & col_in[None, :])
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + dims[None, :] * stride_vd, mask=col_in[:, None], other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out * keep_scale
    o_base = o_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh + seq * stride_ol
    tl.store(o_base + rows[:, None] * stride_ol + dims[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * max_seqlen + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_heads", "max_seqlen"])
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, cu_seqlens_ptr,
    n_heads, max_seqlen,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    batch, head, seq_start, seqlen = _sequence(cu_seqlens_ptr, pid_bh, n_heads, max_seqlen, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seqlen:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen
    dims = tl.arange(0, HEAD_DIM)
    seq = seq_start
    o = tl.load(o_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh + seq * stride_ol
                + rows[:, None] * stride_ol + dims[None, :] * stride_od, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + batch.to(tl.int64) * stride_dob + head * stride_doh + seq * stride_dol
                 + rows[:, None] * stride_dol + dims[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * max_seqlen + rows, delta, mask=row_ok)


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, mask_ptr, cu_seqlens_ptr,
    sm_scale, seed, philox_offset, drop_threshold, keep_scale,
    n_heads, max_seqlen,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_mb, stride_ml,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    batch, head, seq_start, seqlen = _sequence(cu_seqlens_ptr, pid_bh, n_heads, max_seqlen, VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seqlen:
        return
    cols = start_n + tl.arange(0, BLOCK_N)  # this program's keys
    col_in = cols < seqlen
    key_ok = _key_ok(mask_ptr, batch, cols, seqlen, stride_mb, stride_ml, HAS_MASK)
    dims = tl.arange(0, HEAD_DIM)
    seq = seq_start
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh + seq * stride_ql
    do_base = do_ptr + batch.to(tl.int64) * stride_dob + head * stride_doh + seq * stride_dol
    k = tl.load(k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh + seq * stride_kl
                + cols[:, None] * stride_kl + dims[None, :] * stride_kd, mask=col_in[:, None], other=0.0)
    v = tl.load(v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh + seq * stride_vl
                + cols[:, None] * stride_vl + dims[None, :] * stride_vd, mask=col_in[:, None], other=0.0)
    stats_base = pid_bh.to(tl.int64) * max_seqlen
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen
        q = tl.load(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + dims[None, :] * stride_dod, mask=row_ok[:, None],
                     other=0.0)
        # +inf log-sum-exp makes the probabilities of rows past the end exactly 0.
        lse = tl.load(lse_ptr + stats_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stats_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        s_t = tl.where(key_ok[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dO V^T, transposed
        if DROPOUT:
            keep_t = _dropout_keep_t(seed, philox_offset, pid_bh, start_m, start_n, max_seqlen, drop_threshold,
                                     BLOCK_M, BLOCK_N)
            p_dropped_t = tl.where(keep_t, p_t * keep_scale, 0.0)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            p_dropped_t = p_t
        dv += tl.dot(p_dropped_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(dk_ptr + batch.to(tl.int64) * stride_dkb + head * stride_dkh + seq * stride_dkl
             + cols[:, None] * stride_dkl + dims[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty),
             mask=col_in[:, None])
    tl.store(dv_ptr + batch.to(tl.int64) * stride_dvb + head * stride_dvh + seq * stride_dvl
             + cols[:, None] * stride_dvl + dims[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty),
             mask=col_in[:, None])


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, cu_seqlens_ptr,
    sm_scale, seed, philox_offset, drop_threshold, keep_scale,
    n_heads, max_seqlen,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_mb, stride_ml,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    batch, head, seq_start, seqlen = _sequence(cu_seqlens_ptr, pid_bh, n_heads, max_seqlen, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seqlen:
        return
    rows = start_m + tl.arange(0, BLOCK_M)  # this program's queries
    row_ok = rows < seqlen
    dims = tl.arange(0, HEAD_DIM)
    seq = seq_start
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh + seq * stride_kl
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh + seq * stride_vl
    q = tl.load(q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh + seq * stride_ql
                + rows[:, None] * stride_ql + dims[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + batch.to(tl.int64) * stride_dob + head * stride_doh + seq * stride_dol
                 + rows[:, None] * stride_dol + dims[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    stats_base = pid_bh.to(tl.int64) * max_seqlen
    lse = tl.load(lse_ptr + stats_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stats_base + rows, mask=row_ok, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_in = cols < seqlen
        key_ok = _key_ok(mask_ptr, batch, cols, seqlen, stride_mb, stride_ml, HAS_MASK)
        k = tl.load(k_base + cols[:, None] * stride_kl + dims[None, :] * stride_kd, mask=col_in[:, None], other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vl + dims[:, None] * stride_vd, mask=col_in[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = tl.trans(_dropout_keep_t(seed, philox_offset, pid_bh, start_m, start_n, max_seqlen,
                                            drop_threshold, BLOCK_M, BLOCK_N))
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(dq_ptr + batch.to(tl.int64) * stride_dqb + head * stride_dqh + seq * stride_dql
             + rows[:, None] * stride_dql + dims[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------------
# Launch configurations


def device_arch(device: torch.device) -> str:
    """"sm_90" (Hopper and newer), "sm_80" (Ampere/Ada and older CUDA GPUs) or "interpreter" (CPU tensors)."""
    if device.type != "cuda":
        return "interpreter"
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


def launch_configs(head_dim: int, seqlen: int, dtype: torch.dtype, arch: str) -> dict[str, dict[str, int]]:
    """Tile shapes and launch options of the forward, dK/dV and dQ kernels: a fixed function of the arguments.

    Chosen for L in {128, 512}, D = 64 (ELECTRA) so that every config keeps its fp32 accumulators in registers
    without spilling (checked by the compile check): the forward holds a (BLOCK_M, D) accumulator and a
    (BLOCK_M, BLOCK_N) score tile; the backward passes hold two (BLOCK_N, D) or one (BLOCK_M, D) accumulator plus
    two score-sized tiles, hence smaller tiles. Short sequences (L <= 64) use 64-row tiles to waste less of a tile.
    The interpreter gets small tiles so that CPU tests cross several tiles (online softmax, edges) at small L.
    """
    if arch == "interpreter":
        tile = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
        return {"fwd": tile, "dkdv": {**tile, "BLOCK_M": 16, "BLOCK_N": 32}, "dq": tile}
    wide = head_dim == 128
    if dtype == torch.float32:
        # IEEE fp32 dots run as FMAs with both operands in registers: 64 x 64 tiles spilled kilobytes.
        tile = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4 if head_dim <= 32 else 8, "num_stages": 2}
        return {"fwd": tile, "dkdv": tile, "dq": tile}
    stages = 3 if arch == "sm_90" and not wide else 2
    fwd = {"BLOCK_M": 128 if seqlen > 64 else 64, "BLOCK_N": 64, "num_warps": 8 if seqlen > 64 or wide else 4,
           "num_stages": stages}
    if arch == "sm_90":
        # wgmma reads operands from shared memory: (128, 64) key blocks with two fp32 accumulators fit 8 warps.
        dkdv = {"BLOCK_M": 64, "BLOCK_N": 128 if seqlen > 64 and not wide else 64, "num_warps": 8 if seqlen > 64 or wide
                else 4, "num_stages": 2}
        dq = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8 if wide else 4, "num_stages": 2}
    else:
        # mma.sync keeps operands in registers: (64, 64) score tiles spilled with dropout (and 8 warps did worse),
        # so the inner loop steps 32 queries (dK/dV) or 32 keys (dQ) at a time.
        dkdv = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8 if head_dim >= 64 else 4, "num_stages": 2}
        dq = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8 if wide else 4, "num_stages": 2}
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp16/bf16 dots ignore the setting


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a (B, H, L, D) tensor, or of a packed (total, H, D) one (batch 0)."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return 0, t.stride(1), t.stride(0), t.stride(2)


def dropout_threshold(dropout_p: float) -> int:
    """The byte threshold t of the 8-bit keep rule: keep when the draw (0..255) is >= t; drop probability t / 256."""
    return min(round(dropout_p * 256), 255)


def _dropout_args(dropout_p: float, seed: int, offset: int) -> tuple[int, int, int, float]:
    threshold = dropout_threshold(dropout_p)
    return seed, offset, threshold, 1.0 / (1.0 - threshold / 256)


def _geometry(q: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int) -> tuple[int, int, int]:
    """(batch, heads, max sequence length)."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[1], q.shape[2]
    return cu_seqlens.numel() - 1, q.shape[1], max_seqlen


def _dummies(q: torch.Tensor, mask, cu_seqlens):
    """Typed placeholders for absent tensors: the kernel's signature stays the one the compile check compiled."""
    dummy_i8 = torch.empty(1, device=q.device, dtype=torch.int8)
    mask = dummy_i8 if mask is None else mask
    cu_seqlens = torch.zeros(1, device=q.device, dtype=torch.int32) if cu_seqlens is None else cu_seqlens
    mask_strides = (mask.stride(0), mask.stride(1)) if mask.dim() == 2 else (0, 0)
    return mask, cu_seqlens, mask_strides, dummy_i8


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    max_seqlen: int, scale: float, dropout_p: float, seed: int, offset: int, write_keep: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, L, D) or packed (total, H, D) with cu_seqlens; mask (B, L) int8 or None (padded only).

    Writes the output into `out` (q's shape, any strides) when given, else into a new tensor laid out like q.
    Returns (out, lse (B, H, max_seqlen) fp32, keep (B, H, max_seqlen, max_seqlen) int8 0/1 or empty).
    """
    batch, n_heads, seqlen = _geometry(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    config = launch_configs(head_dim, seqlen, q.dtype, device_arch(q.device))["fwd"]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((batch, n_heads, seqlen), device=q.device, dtype=torch.float32)
    use_dropout = dropout_p > 0.0
    keep = torch.zeros((batch, n_heads, seqlen, seqlen) if write_keep and use_dropout else (0,), device=q.device,
                       dtype=torch.int8)
    mask_t, cu_t, mask_strides, dummy = _dummies(q, mask, cu_seqlens)
    grid = (triton.cdiv(seqlen, config["BLOCK_M"]), batch * n_heads)
    if grid[0] * grid[1] > 0:
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, mask_t, cu_t, keep if keep.numel() else dummy,
            scale, *_dropout_args(dropout_p, seed, offset),
            n_heads, seqlen,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *mask_strides,
            HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            VARLEN=cu_seqlens is not None, HAS_MASK=mask is not None, DROPOUT=use_dropout,
            WRITE_KEEP=bool(keep.numel()), DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return out, lse, keep


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float, dropout_p: float,
    seed: int, offset: int, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention_forward's output -> (dq, dk, dv).

    Written into `grads` (three tensors of q's shape, any strides, e.g. slices of one packed gradient) when given,
    else into new tensors, each laid out like its input when that is dense.
    """
    batch, n_heads, seqlen = _geometry(q, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    configs = launch_configs(head_dim, seqlen, q.dtype, device_arch(q.device))
    dq, dk, dv = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) if grads is None else grads
    delta = torch.empty_like(lse)
    mask_t, cu_t, mask_strides, _ = _dummies(q, mask, cu_seqlens)
    if batch * n_heads * seqlen == 0:
        return dq, dk, dv
    varlen, has_mask, use_dropout = cu_seqlens is not None, mask is not None, dropout_p > 0.0
    dropout_args = _dropout_args(dropout_p, seed, offset)
    precision = _dot_precision(q.dtype)

    pre = configs["dq"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(seqlen, pre["BLOCK_M"]), batch * n_heads)](
        out, grad_out, delta, cu_t, n_heads, seqlen, *_strides(out), *_strides(grad_out),
        HEAD_DIM=head_dim, BLOCK_M=pre["BLOCK_M"], VARLEN=varlen, num_warps=4, num_stages=1,
    )
    config = configs["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(seqlen, config["BLOCK_N"]), batch * n_heads)](
        q, k, v, grad_out, dk, dv, lse, delta, mask_t, cu_t,
        scale, *dropout_args, n_heads, seqlen,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv), *mask_strides,
        HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        VARLEN=varlen, HAS_MASK=has_mask, DROPOUT=use_dropout, DOT_PRECISION=precision,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    config = configs["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(seqlen, config["BLOCK_M"]), batch * n_heads)](
        q, k, v, grad_out, dq, lse, delta, mask_t, cu_t,
        scale, *dropout_args, n_heads, seqlen,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), *mask_strides,
        HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        VARLEN=varlen, HAS_MASK=has_mask, DROPOUT=use_dropout, DOT_PRECISION=precision,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dq, dk, dv


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """Every kernel configuration launched for the presets' head dims (plus D = 32 of the tiny preset) at L in
    {128, 512} (and L <= 64, whose forward tiles differ, for short fine-tuning batches), fp32/fp16/bf16, with and
    without key-padding mask and dropout, padded and varlen, as launched on `arch` ("sm_90a" or "sm_80"), for both
    layouts the ops pass: HF's (B, H, L, D) views of a contiguous (B, L, H, D), and the qkv-packed ops' views of one
    (B, L, 3, H, D) / (T, 3, H, D) tensor (token stride 3 * H * D, output (B, L, H, D)). Targets that compile to the
    same specialisation are listed once. The debug keep-mask variant (WRITE_KEEP) is for tests only and not listed.
    """
    head_dims = {m["hidden_size"] // m["num_attention_heads"] for m in models} | {32}  # 32: the tiny preset
    variants = [(False, False, False), (False, False, True), (False, True, False), (False, True, True),
                (True, False, False), (True, False, True)]  # (varlen, mask, dropout)
    targets: dict[tuple, CompileTarget] = {}
    for head_dim in sorted(head_dims):
        for seqlen in (128, 512, 64):
            for dtype, pointer in TRITON_POINTER_TYPES.items():
                configs = launch_configs(head_dim, seqlen, dtype, arch.removesuffix("a"))
                for varlen, has_mask, dropout in variants:
                    for qkv_packed in (False, True):
                        for target in _targets_for(configs, head_dim, seqlen, dtype, pointer, arch, varlen, has_mask,
                                                   dropout, qkv_packed):
                            key = (target.kernel.__name__, tuple(target.signature.items()),
                                   tuple(sorted(target.constexprs.items())), target.aligned, target.num_warps,
                                   target.num_stages)
                            if key not in targets:
                                targets[key] = target
                            elif qkv_packed and "qkv-packed" not in targets[key].label:
                                # Same binary (every token stride is a multiple of 16): say that it covers both.
                                targets[key] = dataclasses.replace(targets[key],
                                                                   label=targets[key].label + " +qkv-packed")
    return list(targets.values())


def _targets_for(configs, head_dim, seqlen, dtype, pointer, arch, varlen, has_mask, dropout,
                 qkv_packed) -> list[CompileTarget]:
    n_heads, not_specialized = 12, 12345  # values of the do_not_specialize ints are irrelevant
    output_token_stride = n_heads * head_dim
    input_token_stride = 3 * output_token_stride if qkv_packed else output_token_stride
    strides = {}
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        token_stride = input_token_stride if t in ("q", "k", "v", "dq", "dk", "dv") else output_token_stride
        strides.update({f"stride_{t}b": 0 if varlen else seqlen * token_stride, f"stride_{t}h": head_dim,
                        f"stride_{t}l": token_stride, f"stride_{t}d": 1})
    ints = {
        **strides, "stride_mb": not_specialized, "stride_ml": 1 if has_mask else 0,
        "n_heads": not_specialized, "max_seqlen": not_specialized, "seed": not_specialized,
        "philox_offset": not_specialized, "drop_threshold": not_specialized,
    }
    pointers = {
        **dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"], pointer),
        "lse_ptr": "*fp32", "delta_ptr": "*fp32", "mask_ptr": "*i8", "keep_ptr": "*i8", "cu_seqlens_ptr": "*i32",
    }
    scalars = {"sm_scale": "fp32", "keep_scale": "fp32"}
    flags = {"VARLEN": varlen, "HAS_MASK": has_mask, "DROPOUT": dropout, "DOT_PRECISION": _dot_precision(dtype)}
    label = (f"D={head_dim} L={seqlen} {pointer[1:]} {arch} cfg mask={has_mask} dropout={dropout} "
             f"varlen={varlen}{' qkv-packed' if qkv_packed else ''}")
    tensor_cores = dtype != torch.float32
    kernels = [
        (_attn_fwd_kernel, configs["fwd"], {**flags, "WRITE_KEEP": False}, tensor_cores),
        (_attn_bwd_dkdv_kernel, configs["dkdv"], flags, tensor_cores),
        (_attn_bwd_dq_kernel, configs["dq"], flags, tensor_cores),
        (_attn_bwd_preprocess_kernel, {"BLOCK_M": configs["dq"]["BLOCK_M"], "num_warps": 4, "num_stages": 1},
         {"VARLEN": varlen}, False),
    ]
    targets = []
    for fn, config, constexprs, multiplies in kernels:
        blocks = {name: config[name] for name in ("BLOCK_M", "BLOCK_N") if name in fn.arg_names}
        constexprs = {"HEAD_DIM": head_dim, **blocks, **{k: v for k, v in constexprs.items() if k in fn.arg_names}}
        used = {name: value for name, value in ints.items() if name in fn.arg_names}
        targets.append(specialized_target(
            fn, pointers={n: p for n, p in pointers.items() if n in fn.arg_names}, ints=used, constexprs=constexprs,
            scalars={n: t for n, t in scalars.items() if n in fn.arg_names}, num_warps=config["num_warps"],
            num_stages=config["num_stages"], multiplies_matrices=multiplies, label=label,
        ))
    return targets
