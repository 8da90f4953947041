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

Cases the kernel cannot serve run transformers' SDPA attention instead, with one warning per reason: causal
attention, masks that are not key-padding masks (4D masks: user-built, or causal/overlaid patterns), keys of another
length than the queries (cross-attention). Head dims other than 32/64/128 are left to the op (it runs its PyTorch
reference, with one warning).

    model = ElectraModel.from_pretrained(path, attn_implementation="electra_triton")
    model.set_attn_implementation("electra_triton")
"""

import logging

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..ops.attention import attention, attention_varlen, pad_input, unpad_input

NAME = "electra_triton"
# Unpadding costs a gather of q, k, v and a scatter of the output per layer; attention saved grows with the padding.
# Chosen without GPU measurement (2026-11-22): re-tune with benchmarks/attention.py's varlen case.
VARLEN_PADDING_FRACTION = 0.3

logger = logging.getLogger("electra_triton")
_warned: set[str] = set()
# Per key-padding mask (one per model forward, shared by all layers): (indices, cu_seqlens, max_seqlen) or None
# when the padded kernel is used. Computed at the first layer; one host synchronisation per forward, not per layer.
_unpadding: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("electra_triton attention: %s; running transformers' SDPA attention instead", reason)


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
    """AttentionInterface entry: query/key/value (B, H, L, D) -> ((B, L, H, D), None), as transformers expects."""
    if kwargs.get("is_causal", getattr(module, "is_causal", False)):
        return _fallback("causal attention", module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if key.shape[2] != query.shape[2] or key.shape != value.shape or key.shape[:2] != query.shape[:2]:
        return _fallback("keys of another length or head count than the queries", module, query, key, value,
                         attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        return _fallback("a mask that is not a key-padding mask", module, query, key, value, attention_mask,
                         dropout, scaling, **kwargs)
    if attention_mask is None:
        return attention(query, key, value, None, dropout, scaling).transpose(1, 2), None
    unpadding = _unpadding_of(attention_mask)
    if unpadding is None:
        return attention(query, key, value, attention_mask, dropout, scaling).transpose(1, 2), None
    indices, cu_seqlens, max_seqlen = unpadding
    batch, heads, seqlen, head_dim = query.shape
    packed = [t.transpose(1, 2).reshape(batch * seqlen, heads, head_dim).index_select(0, indices)
              for t in (query, key, value)]  # (total, H, D)
    out = attention_varlen(*packed, cu_seqlens, max_seqlen, dropout, scaling)
    return pad_input(out, indices, batch, seqlen), None  # (B, L, H, D)


def register() -> None:
    """Register the backend and its mask function with transformers (done on `import electra_triton`)."""
    AttentionInterface.register(NAME, electra_triton_attention)
    AttentionMaskInterface.register(NAME, electra_triton_mask)


register()
