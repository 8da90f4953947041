"""Fused replaced-token-detection (RTD) loss: ELECTRA's discriminator head projection + masked mean BCE-with-logits.

Computes, for hidden (B, L, H), weight (1, H), bias (1,), labels and attention mask (B, L):

    logit[b, l] = hidden[b, l] @ weight[0] + bias[0]
    loss        = sum over active tokens of BCEWithLogits(logit, label) / max(#active, 1)

where a token is active when attention_mask == 1 (every token without a mask), exactly as
ElectraForPreTraining.forward selects them.

Forward: one pass over `hidden` (the projection is a dot product per token: memory-bound, no tensor cores), stable
log-sigmoid, per-program partial sums of loss and active count (reduced deterministically by the launcher). The fp32
logits are written only when the caller asks for them or backward needs them.

Backward: one pass over `hidden` that writes d_hidden = dlogit * weight and accumulates d_weight = sum(dlogit * hidden)
and d_bias = sum(dlogit) into per-program partials (no atomics, deterministic). dlogit is recomputed from the saved
logits; the incoming gradient and the active count are read from device memory, so nothing synchronises the host.

Supports fp32, fp16, bf16 hidden (fp32 accumulation always), any B, L, H, any strides of hidden/labels/mask (a
non-unit hidden stride along H works but loads uncoalesced), labels and mask of any integer, bool or float dtype.
"""


import torch
import triton
import triton.language as tl

from ._compile import TRITON_POINTER_TYPES, CompileTarget, specialized_target
from ._launch import programs_per_device


@triton.jit
def _rtd_loss_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, mask_ptr,
    logits_ptr, partial_loss_ptr, partial_count_ptr,
    n_rows, seq_len, hidden_size,
    stride_hb, stride_hl, stride_hh, stride_w,
    stride_yb, stride_yl, stride_mb, stride_ml,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) flat token index b * L + l
    row_ok = rows < n_rows
    # int64 offsets: B * L * H may exceed 2**31.
    batch, pos = (rows // seq_len).to(tl.int64), (rows % seq_len).to(tl.int64)
    row_start = hidden_ptr + batch * stride_hb + pos * stride_hl

    products = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < hidden_size
        x = tl.load(row_start[:, None] + cols[None, :] * stride_hh, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + cols * stride_w, mask=col_ok, other=0.0)
        products += x.to(tl.float32) * w.to(tl.float32)[None, :]
    logit = tl.sum(products, axis=1)  # (BLOCK_M,)
    if HAS_BIAS:
        logit += tl.load(bias_ptr).to(tl.float32)

    label = tl.load(labels_ptr + batch * stride_yb + pos * stride_yl, mask=row_ok, other=0).to(tl.float32)
    active = row_ok
    if HAS_MASK:
        keep = tl.load(mask_ptr + batch * stride_mb + pos * stride_ml, mask=row_ok, other=0).to(tl.float32)
        active = active & (keep == 1.0)
    # BCE with logits, stable for any |logit|: max(z, 0) - z*y + log(1 + exp(-|z|)).
    loss = tl.maximum(logit, 0.0) - logit * label + tl.log(1.0 + tl.exp(-tl.abs(logit)))
    loss = tl.where(active, loss, 0.0)

    tl.store(partial_loss_ptr + pid, tl.sum(loss, axis=0))
    tl.store(partial_count_ptr + pid, tl.sum(active.to(tl.float32), axis=0))
    if WRITE_LOGITS:
        tl.store(logits_ptr + rows, logit, mask=row_ok)


@triton.jit
def _rtd_loss_bwd_kernel(
    hidden_ptr, weight_ptr, labels_ptr, mask_ptr, logits_ptr, grad_loss_ptr, grad_logits_ptr, count_ptr,
    d_hidden_ptr, partial_dw_ptr, partial_db_ptr,
    n_rows, seq_len, hidden_size, rows_per_program,
    stride_hb, stride_hl, stride_hh, stride_w,
    stride_yb, stride_yl, stride_mb, stride_ml,
    HAS_MASK: tl.constexpr, HAS_GRAD_LOGITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Grid: (row groups, hidden chunks). Each program owns BLOCK_H columns of `rows_per_program` rows, so its d_weight
    # partial stays in registers across its rows.
    group, chunk = tl.program_id(0), tl.program_id(1)
    cols = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden_size
    w = tl.load(weight_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    # d loss / d logit = (sigmoid(z) - y) * grad / #active over active tokens.
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.maximum(tl.load(count_ptr), 1.0)

    first_row = group * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    dw = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(first_row, last_row, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < last_row
        batch, pos = (rows // seq_len).to(tl.int64), (rows % seq_len).to(tl.int64)
        logit = tl.load(logits_ptr + rows, mask=row_ok, other=0.0)
        label = tl.load(labels_ptr + batch * stride_yb + pos * stride_yl, mask=row_ok, other=0).to(tl.float32)
        active = row_ok
        if HAS_MASK:
            keep = tl.load(mask_ptr + batch * stride_mb + pos * stride_ml, mask=row_ok, other=0).to(tl.float32)
            active = active & (keep == 1.0)
        d_logit = tl.where(active, (tl.sigmoid(logit) - label) * scale, 0.0)  # (BLOCK_M,)
        if HAS_GRAD_LOGITS:  # the caller also differentiates through the returned logits
            d_logit += tl.load(grad_logits_ptr + rows, mask=row_ok, other=0.0)

        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(hidden_ptr + batch[:, None] * stride_hb + pos[:, None] * stride_hl + cols[None, :] * stride_hh,
                    mask=tile_ok, other=0.0)
        d_x = d_logit[:, None] * w[None, :]
        tl.store(d_hidden_ptr + rows.to(tl.int64)[:, None] * hidden_size + cols[None, :], d_x.to(x.dtype), mask=tile_ok)
        dw += d_logit[:, None] * x.to(tl.float32)
        db += d_logit

    tl.store(partial_dw_ptr + group * hidden_size + cols, tl.sum(dw, axis=0), mask=col_ok)
    if chunk == 0:
        tl.store(partial_db_ptr + group, tl.sum(db, axis=0))


def launch_config(hidden_size: int) -> dict[str, int]:
    """Tile shape for a hidden size: 4K elements per tile (16 per thread), wide along H for coalesced 16-byte loads.

    Larger tiles spill in backward (checked by the compile check: 8K-element tiles needed 255 registers and spilled).
    """
    block_h = min(256, triton.next_power_of_2(hidden_size))
    return {"BLOCK_H": block_h, "BLOCK_M": max(16, 4096 // block_h), "num_warps": 8, "num_stages": 2}



def rtd_loss_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    mask: torch.Tensor | None, write_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, L, H), weight (1, H), bias (1,) or None, labels/mask (B, L) -> (loss, count, logits).

    loss and count are fp32 scalars; logits is fp32 (B, L), or empty unless `write_logits`.
    """
    batch, seq_len, hidden_size = hidden.shape
    n_rows = batch * seq_len
    config = launch_config(hidden_size)
    n_programs = max(1, triton.cdiv(n_rows, config["BLOCK_M"]))
    partials = torch.empty((2, n_programs), device=hidden.device, dtype=torch.float32)
    logits = torch.empty((batch, seq_len) if write_logits else (0,), device=hidden.device, dtype=torch.float32)
    _rtd_loss_fwd_kernel[(n_programs,)](
        hidden, weight, bias if bias is not None else weight, labels, mask if mask is not None else labels,
        logits, partials[0], partials[1],
        n_rows, seq_len, hidden_size,
        *hidden.stride(), weight.stride(1),
        *labels.stride(), *(mask.stride() if mask is not None else (0, 0)),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, WRITE_LOGITS=write_logits,
        BLOCK_M=config["BLOCK_M"], BLOCK_H=config["BLOCK_H"], num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    count = partials[1].sum()
    return partials[0].sum() / count.clamp_min(1.0), count, logits


def rtd_loss_backward(
    grad_loss: torch.Tensor, grad_logits: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor,
    labels: torch.Tensor, mask: torch.Tensor | None, logits: torch.Tensor, count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of rtd_loss_forward's loss (plus grad_logits (B, L) fp32 flowing into its logits, if not None)
    -> (d_hidden (B, L, H) contiguous, d_weight (1, H), d_bias (1,))."""
    batch, seq_len, hidden_size = hidden.shape
    n_rows = batch * seq_len
    config = launch_config(hidden_size)
    n_chunks = triton.cdiv(hidden_size, config["BLOCK_H"])
    wanted_groups = max(1, programs_per_device(hidden.device) // n_chunks)
    rows_per_program = triton.cdiv(max(n_rows, 1), wanted_groups)
    rows_per_program = triton.cdiv(rows_per_program, config["BLOCK_M"]) * config["BLOCK_M"]
    n_groups = max(1, triton.cdiv(n_rows, rows_per_program))

    d_hidden = torch.empty((batch, seq_len, hidden_size), device=hidden.device, dtype=hidden.dtype)
    partial_dw = torch.empty((n_groups, hidden_size), device=hidden.device, dtype=torch.float32)
    partial_db = torch.empty((n_groups,), device=hidden.device, dtype=torch.float32)
    _rtd_loss_bwd_kernel[(n_groups, n_chunks)](
        hidden, weight, labels, mask if mask is not None else labels, logits, grad_loss,
        grad_logits if grad_logits is not None else logits, count, d_hidden, partial_dw, partial_db,
        n_rows, seq_len, hidden_size, rows_per_program,
        *hidden.stride(), weight.stride(1),
        *labels.stride(), *(mask.stride() if mask is not None else (0, 0)),
        HAS_MASK=mask is not None, HAS_GRAD_LOGITS=grad_logits is not None,
        BLOCK_M=config["BLOCK_M"], BLOCK_H=config["BLOCK_H"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    d_weight = partial_dw.sum(dim=0, keepdim=True).to(weight.dtype)
    d_bias = partial_db.sum().reshape(1).to(weight.dtype)
    return d_hidden, d_weight, d_bias


def compile_targets(models: list[dict], arch: str) -> list[CompileTarget]:
    """Every configuration launched for the discriminators' hidden sizes, at L = 512, labels and mask int64 as HF."""
    targets = []
    batch, seq_len = 32, 512
    for hidden_size in sorted({m["hidden_size"] for m in models if m["role"] == "discriminator"}):
        config = launch_config(hidden_size)
        blocks = {"BLOCK_M": config["BLOCK_M"], "BLOCK_H": config["BLOCK_H"]}
        ints = {
            "n_rows": batch * seq_len, "seq_len": seq_len, "hidden_size": hidden_size, "rows_per_program": 128,
            "stride_hb": seq_len * hidden_size, "stride_hl": hidden_size, "stride_hh": 1, "stride_w": 1,
            "stride_yb": seq_len, "stride_yl": 1, "stride_mb": seq_len, "stride_ml": 1,
        }
        launch = {"num_warps": config["num_warps"], "num_stages": config["num_stages"], "multiplies_matrices": False}
        for pointer in TRITON_POINTER_TYPES.values():
            pointers = {
                "hidden_ptr": pointer, "weight_ptr": pointer, "bias_ptr": pointer, "d_hidden_ptr": pointer,
                "labels_ptr": "*i64", "mask_ptr": "*i64", **dict.fromkeys([
                    "logits_ptr", "partial_loss_ptr", "partial_count_ptr", "grad_loss_ptr", "grad_logits_ptr",
                    "count_ptr", "partial_dw_ptr", "partial_db_ptr"], "*fp32"),
            }
            for has_mask in (False, True):
                for write_logits in (False, True):
                    targets.append(specialized_target(
                        _rtd_loss_fwd_kernel, pointers=pointers, ints=ints, constexprs={
                            "HAS_BIAS": True, "HAS_MASK": has_mask, "WRITE_LOGITS": write_logits, **blocks},
                        label=f"H={hidden_size} {pointer[1:]} mask={has_mask} logits={write_logits}", **launch,
                    ))
                for has_grad_logits in (False, True):
                    targets.append(specialized_target(
                        _rtd_loss_bwd_kernel, pointers=pointers, ints=ints, constexprs={
                            "HAS_MASK": has_mask, "HAS_GRAD_LOGITS": has_grad_logits, **blocks},
                        label=f"H={hidden_size} {pointer[1:]} mask={has_mask} grad_logits={has_grad_logits}",
                        **launch,
                    ))
    return targets
