"""unpad_plan: where the real tokens of a padded (and possibly packed) batch are, computed once per batch.

A plan says which of the B x L slots hold real tokens and how they split into sequences, so that an encoder can run
every layer on the (total_tokens, hidden) real tokens only and attention (`attention_varlen`) keeps each sequence to
itself. Sequences are the real tokens of each row, or, with `position_ids`, the runs of real tokens that restart at
position 0 (several examples packed into one row, as transformers' DataCollatorWithFlattening and
`electra-triton pretrain --packing` lay them out).

Build it where it is free: on the CPU in the data loader (no device synchronisation at all), then move it with the
batch (`plan.to(device, non_blocking=True)`). Built from device tensors it costs one host synchronisation (the token
count), two with `position_ids` (the sequence count), one with `position_ids` and no mask; `max_seqlen` is then the
row length L, an upper bound that the varlen kernel accepts, unless given.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_shape, check_tensor


class UnpadPlan(NamedTuple):
    indices: torch.Tensor  # (T,) int64: flat b * L + l positions of the real tokens, in order
    cu_seqlens: torch.Tensor  # (N + 1,) int32: sequence boundaries in the packed (T, ...) stream
    max_seqlen: int  # the longest sequence, or an upper bound of it
    batch: int  # B of the padded layout
    seqlen: int  # L of the padded layout
    packed: bool = False  # sequences split at position_ids restarts (a row may hold several): never run padded

    @property
    def total_tokens(self) -> int:
        return self.indices.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "UnpadPlan":
        return self._replace(indices=self.indices.to(device, non_blocking=non_blocking),
                             cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking))


def unpad_plan(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None, max_seqlen: int | None = None,
) -> UnpadPlan:
    """The plan of a (B, L) `attention_mask` (nonzero = real token; any pattern: right or left padding, holes).

    position_ids (B, L): a new sequence starts at each real token with position id 0 (and at each row's first real
    token); the plan is then `packed`. attention_mask may be None with position_ids (every slot real: packed rows
    without padding). max_seqlen: an upper bound to use instead of the exact longest sequence (exact on CPU tensors,
    L on others unless given, which spares a synchronisation). Rows without a real token have no sequence.
    """
    every_slot_real = attention_mask is None
    if every_slot_real:
        if position_ids is None:
            raise ValueError("attention_mask may be None only with position_ids")
        attention_mask = torch.ones(check_tensor("position_ids", position_ids).shape, dtype=torch.bool,
                                    device=position_ids.device)
    attention_mask = check_tensor("attention_mask", attention_mask)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (B, L), got {tuple(attention_mask.shape)}")
    batch, seqlen = attention_mask.shape
    if position_ids is not None:
        position_ids = check_tensor("position_ids", position_ids)
        check_shape("position_ids", position_ids, (batch, seqlen))
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")

    real = attention_mask != 0  # (B, L)
    if every_slot_real:  # no synchronisation for the token count
        indices = torch.arange(batch * seqlen, device=attention_mask.device)
    else:
        indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()  # (T,)
    if position_ids is None:
        seqlens = real.sum(dim=1, dtype=torch.int32)  # (B,): empty rows give empty sequences, harmless
        cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    else:
        row = torch.div(indices, seqlen, rounding_mode="floor")
        starts = position_ids.flatten().index_select(0, indices) == 0  # (T,)
        starts[1:] |= row[1:] != row[:-1]
        if starts.numel():
            starts[0] = True
        start_at = torch.nonzero(starts, as_tuple=False).flatten()
        cu_seqlens = torch.cat([start_at, start_at.new_tensor([indices.shape[0]])]).to(torch.int32)
    if max_seqlen is None:
        if attention_mask.device.type == "cpu":
            max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
        else:
            max_seqlen = seqlen
    return UnpadPlan(indices, cu_seqlens, max_seqlen, batch, seqlen, packed=position_ids is not None)


@torch.library.custom_op("electra_triton::unpad_plan_of_mask", mutates_args=())
def _plan_of_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    plan = unpad_plan(attention_mask, max_seqlen=attention_mask.shape[1])
    return plan.indices, plan.cu_seqlens


@_plan_of_mask.register_fake
def _(attention_mask):
    total_tokens = torch.library.get_ctx().new_dynamic_size(max=attention_mask.numel())
    return (attention_mask.new_empty((total_tokens,), dtype=torch.int64),
            attention_mask.new_empty((attention_mask.shape[0] + 1,), dtype=torch.int32))


def traceable_unpad_plan(attention_mask: torch.Tensor) -> UnpadPlan:
    """`unpad_plan(attention_mask, max_seqlen=L)` as one opaque op, for code that torch.compile traces: the token count
    is a data-dependent size there (dynamo keeps it symbolic, with no graph break). Eager callers should use
    `unpad_plan`, whose synchronisation a dispatch-mode tracer can see."""
    attention_mask = check_tensor("attention_mask", attention_mask)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (B, L), got {tuple(attention_mask.shape)}")
    indices, cu_seqlens = _plan_of_mask(attention_mask)
    return UnpadPlan(indices, cu_seqlens, attention_mask.shape[1], *attention_mask.shape)
