"""`attn_implementation="electra_triton"`: the fused attention op as a Hugging Face transformers attention backend.

Registered on `import electra_triton` with both of transformers' registries (transformers >= 5.17):

- `AttentionMaskInterface["electra_triton"]` (`electra_triton_mask`): for the plain bidirectional (encoder) mask that
  ELECTRA, BERT and RoBERTa build, returns the 2D (B, L) bool key-padding mask itself (None when nothing is
  padded), instead of a (B, 1, L, L) float bias. Any other pattern (causal decoders, or/and mask overlays) is built
  as for SDPA. Without a mask function of its own, a registered attention would silently receive mask=None.
- `AttentionInterface["electra_triton"]` (`electra_triton_attention`): runs `electra_triton.ops.attention` on the
  key-padding mask, or `attention_varlen` on the real tokens only when at least `VARLEN_PADDING_FRACTION` of the
  batch is padding (padding query rows then get zeros, as with flash_attention_2; the model never reads them).
  Dropout is what the module passes: its `dropout.p` in training, 0 in eval.

Packed sequences follow transformers' flash-attention conventions (DataCollatorWithFlattening) and run
`attention_varlen`, each sequence attending to itself only: without a mask, `cu_seq_lens_q` / `cu_seq_lens_k` /
`max_length_q` / `max_length_k` forward kwargs give the boundaries in the flattened batch; otherwise `position_ids`
that restart at their minimum (0, or a RoBERTa-style start) inside a row start a new sequence there, with or
without a padding mask. Boundaries are worked out once per forward (cached on the kwargs' tensors), not per layer;
while dynamo traces (torch.compile), position ids are not searched for restarts (a data-dependent shape).

`output_attentions=True` (the forward kwarg, or the config's) runs transformers' eager attention for that call and
returns its exact probabilities (the mask, packing included, as the kernel would apply it), with a one-time note.

Cases the kernel cannot serve run transformers' SDPA attention instead, with one warning per reason: causal
attention, masks that are not key-padding masks (4D masks: user-built, or causal/overlaid patterns), keys of another
length than the queries (cross-attention). Head dims other than 32/64/128 are left to the op (it runs its PyTorch
reference, with one warning).

    model = ElectraModel.from_pretrained(path, attn_implementation="electra_triton")
    model.set_attn_implementation("electra_triton")
"""

import logging
from typing import Any, NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, sdpa_mask
from transformers.modeling_utils import AttentionInterface

# ELECTRA's and RoBERTa's eager attention are copies of BERT's; this one serves all three (and any other model).
from transformers.models.bert.modeling_bert import eager_attention_forward

from ..ops.attention import attention, attention_varlen, pad_input, unpad_input
from ..ops.unpad import unpad_plan

NAME = "electra_triton"
# Unpadding here costs a gather of q, k, v and a scatter of the output in every layer (this backend sees one attention
# call, not the encoder), and only attention's FLOPs are saved; hence a higher bar than the patched encoder's
# MIN_PADDING_FRACTION (1/64), which gathers once per forward and saves every GEMM's padding too.
# Chosen without GPU measurement (2026-11-22): re-tune with benchmarks/attention.py's varlen case.
VARLEN_PADDING_FRACTION = 0.3

logger = logging.getLogger("electra_triton")
_warned: set[str] = set()
ATTENTION_MAPS = "attention maps are returned (output_attentions=True)"  # why eager_attention runs, by default
# Per key-padding mask (one per model forward, shared by all layers): (indices, cu_seqlens, max_seqlen) or None
# when the padded kernel is used. Computed at the first layer; one host synchronisation per forward, not per layer.
_unpadding: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Per forward, keyed on its position_ids or cu_seq_lens_q tensor (the same object reaches every layer): the packed
# sequences found there, or None. Position ids also hold the mask they were read with: (mask, Sequences | None).
_packing: WeakIdKeyDictionary = WeakIdKeyDictionary()


class Sequences(NamedTuple):
    """Where each sequence's tokens are in the (B * L) flattened batch."""

    indices: torch.Tensor | None  # (T,) flat positions of the tokens that belong to a sequence; None: all of them
    cu_seqlens: torch.Tensor  # (N + 1,) int32 boundaries in the (T,) stream
    max_seqlen: int


def _note_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("electra_triton attention: %s", message)


def _warn_once(reason: str) -> None:
    _note_once(f"{reason}; running transformers' SDPA attention instead")


def electra_triton_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function=bidirectional_mask_function, attention_mask: torch.Tensor | None = None, **kwargs,
) -> torch.Tensor | None:
    """AttentionMaskInterface entry: (B, kv_length) bool key-padding mask for plain bidirectional attention, None
    without padding; for anything else, SDPA's (B, 1, q, kv) boolean mask (served by the SDPA fallback)."""
    if mask_function is bidirectional_mask_function and (not isinstance(q_offset, int) or q_offset == 0):
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
        return None if bool(attention_mask.all()) else attention_mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def _unpadding_of(mask: torch.Tensor):
    if mask not in _unpadding:
        if int(mask.sum().item()) <= (1.0 - VARLEN_PADDING_FRACTION) * mask.numel():
            _, indices, cu_seqlens, max_seqlen = unpad_input(mask[..., None], mask)
            _unpadding[mask] = (indices, cu_seqlens, max_seqlen)
        else:
            _unpadding[mask] = None
    return _unpadding[mask]


def _packed_by_kwargs(kwargs: dict[str, Any]) -> Sequences | None:
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True): boundaries given in the forward's kwargs."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    if any(kwargs.get(name) is None for name in names):
        return None
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    if cu_q not in _packing:
        if cu_k is not cu_q and not torch.equal(cu_k, cu_q):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: electra_triton attention is self-attention")
        max_length = max(int(kwargs["max_length_q"]), int(kwargs["max_length_k"]))
        _packing[cu_q] = Sequences(None, cu_q.to(torch.int32), max_length)
    return _packing[cu_q]


def _packed_by_position_ids(position_ids: Any, mask: torch.Tensor | None, batch: int, seqlen: int) -> Sequences | None:
    """Sequences restarting inside a row (position ids back at their minimum), or None when every row holds one.

    Not under torch.compile: finding them is a data-dependent shape."""
    if torch.compiler.is_compiling() or not isinstance(position_ids, torch.Tensor):
        return None
    if position_ids.dim() != 2 or position_ids.shape[1] != seqlen or position_ids.shape[0] not in (1, batch):
        return None
    cached = _packing.get(position_ids)
    if cached is not None and cached[0] is mask:
        return cached[1]
    real = torch.ones(batch, seqlen, dtype=torch.bool, device=position_ids.device) if mask is None else mask
    # transformers' flash attention starts a sequence where the position id is the batch's minimum (0, or 2 for
    # RoBERTa-style ids); ops.unpad_plan starts one at position id 0.
    plan = unpad_plan(real, (position_ids - position_ids.min()).expand(batch, seqlen))
    rows = batch if mask is None else int(mask.any(dim=1).sum())
    sequences = None
    if plan.cu_seqlens.shape[0] - 1 > rows:
        sequences = Sequences(None if mask is None else plan.indices, plan.cu_seqlens, plan.max_seqlen)
    _packing[position_ids] = (mask, sequences)
    return sequences


def _packed_sequences(mask: torch.Tensor | None, batch: int, seqlen: int, kwargs: dict[str, Any]) -> Sequences | None:
    """Packed sequences in this batch (transformers' conventions, see the module docstring), None if there are none."""
    if mask is None:
        sequences = _packed_by_kwargs(kwargs)
        if sequences is not None:
            return sequences
    return _packed_by_position_ids(kwargs.get("position_ids"), mask, batch, seqlen)


def attention_maps_requested(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this forward returns attention probabilities: the output_attentions kwarg, else the config's (as
    transformers' output capturing decides)."""
    requested = kwargs.get("output_attentions")
    if requested is None:
        requested = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(requested)


def _additive_mask(attention_mask: torch.Tensor | None, sequences: Sequences | None, batch: int, seqlen: int,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """The (B, 1, L or 1, L) float mask eager attention adds to the scores, from a key-padding (B, L) mask, an SDPA
    boolean or additive 4D mask, and packed sequences (a token attends to its own sequence only)."""
    if sequences is not None:
        device = sequences.cu_seqlens.device
        lengths = sequences.cu_seqlens.diff()
        ids = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths)
        token_sequence = torch.full((batch * seqlen,), -1, dtype=ids.dtype, device=device)
        if sequences.indices is None:
            token_sequence[: ids.shape[0]] = ids
        else:
            token_sequence[sequences.indices] = ids
        token_sequence = token_sequence.view(batch, 1, seqlen)
        allowed = (token_sequence[..., None] == token_sequence[..., None, :]) & (token_sequence[..., None, :] >= 0)
    elif attention_mask is None:
        return None
    elif attention_mask.dim() == 2:
        allowed = attention_mask.bool()[:, None, None, :]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        return attention_mask.to(dtype)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def eager_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float, scaling: float | None,
    sequences: Sequences | None = None, reason: str = ATTENTION_MAPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention on (B, H, L, D) q, k, v: ((B, L, H, D) output, (B, H, L, L) probabilities).

    The path for `output_attentions=True` (the fused kernels never form the probabilities) and for masks the kernel
    does not take. `attention_mask` may be any mask transformers hands to attention (key-padding (B, L), SDPA boolean
    or additive 4D); `sequences` restricts attention to packed sequences. Notes `reason` once."""
    _note_once(f"fused attention is off while {reason}: transformers' eager attention computes those calls")
    batch, _, seqlen, _ = query.shape
    mask = _additive_mask(attention_mask, sequences, batch, seqlen, query.dtype)
    return eager_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    _warn_once(reason)
    if attention_mask is not None and attention_mask.dim() == 2:  # our key-padding mask, as SDPA's boolean form
        attention_mask = attention_mask[:, None, None, :]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def electra_triton_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: query/key/value (B, H, L, D) -> ((B, L, H, D), None), as transformers expects;
    ((B, L, H, D), (B, H, L, L) probabilities) when attention maps are requested."""
    batch, heads, seqlen, head_dim = query.shape
    padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    plain_self_attention = key.shape[2] == seqlen and (attention_mask is None or padding_mask is not None)
    sequences = _packed_sequences(padding_mask, batch, seqlen, kwargs) if plain_self_attention else None
    if attention_maps_requested(module, kwargs):
        return eager_attention(module, query, key, value, attention_mask, dropout, scaling, sequences)
    if kwargs.get("is_causal", getattr(module, "is_causal", False)):
        return _fallback("causal attention", module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if key.shape[2] != query.shape[2] or key.shape != value.shape or key.shape[:2] != query.shape[:2]:
        return _fallback("keys of another length or head count than the queries", module, query, key, value,
                         attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        return _fallback("a mask that is not a key-padding mask", module, query, key, value, attention_mask,
                         dropout, scaling, **kwargs)
    if sequences is None and attention_mask is not None:
        unpadding = _unpadding_of(attention_mask)
        if unpadding is not None:
            sequences = Sequences(*unpadding)
    if sequences is None:
        return attention(query, key, value, attention_mask, dropout, scaling).transpose(1, 2), None
    flat = [t.transpose(1, 2).reshape(batch * seqlen, heads, head_dim) for t in (query, key, value)]
    if sequences.indices is None:
        out = attention_varlen(*flat, sequences.cu_seqlens, sequences.max_seqlen, dropout, scaling)
        return out.view(batch, seqlen, heads, head_dim), None
    packed = [t.index_select(0, sequences.indices) for t in flat]  # (total, H, D)
    out = attention_varlen(*packed, sequences.cu_seqlens, sequences.max_seqlen, dropout, scaling)
    return pad_input(out, sequences.indices, batch, seqlen), None  # (B, L, H, D)


def register() -> None:
    """Register the backend and its mask function with transformers (done on `import electra_triton`)."""
    AttentionInterface.register(NAME, electra_triton_attention)
    AttentionMaskInterface.register(NAME, electra_triton_mask)


register()
