"""The fused forwards that `patch` binds to module instances, by module kind, and the dtype rules they share.

Each reads its own module's parameters inside its own forward (what FSDP's per-module unsharding and DDP's hooks
need) and what is fused there from the module's MARK attribute, set by `patch`.
"""

import threading
import weakref
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.electra import modeling_electra as electra
from transformers.models.roberta import modeling_roberta as roberta
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .. import ops
from .attention_backend import attention_maps_requested, eager_attention

MARK = "_electra_triton"  # instance attribute of a patched module: {what is fused there: how}


# ---------------------------------------------------------------------------------------------------------------------
# Dtypes: the ops take matching dtypes, so cast as transformers' modules would under autocast.


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _no_autocast(device: torch.device):
    # The ops' own PyTorch code (references, chunk matmuls) must not be re-cast by an enclosing autocast.
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) else nullcontext()


def _linear_inputs(x: torch.Tensor, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, weight, bias in the dtype nn.Linear would compute in (the autocast dtype under autocast)."""
    dtype = _autocast_dtype(x.device)
    weight, bias = linear.weight, linear.bias
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _gelu_linear(module: nn.Module, linear: nn.Linear, activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    approximate = getattr(module, MARK).get("gelu_linear")
    if approximate is None:
        return activation(linear(x))
    x, weight, bias = _linear_inputs(x, linear)
    with _no_autocast(x.device):
        return ops.gelu_linear(x, weight, bias, approximate)


def _layer_norm(
    module: nn.Module, norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None, dropout: nn.Module | None,
) -> torch.Tensor:
    """LayerNorm(dropout(x) + residual), fused when the module's layer_norm flag is on."""
    p = dropout.p if dropout is not None and module.training else 0.0
    if not getattr(module, MARK).get("layer_norm"):
        x = dropout(x) if dropout is not None else x
        return norm(x if residual is None else x + residual)
    # As transformers computes it: x + residual promotes, and LayerNorm runs in fp32 under autocast.
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if _autocast_dtype(x.device) is not None:
        dtype = torch.float32
    with _no_autocast(x.device):
        return ops.dropout_add_layer_norm(
            x.to(dtype), None if residual is None else residual.to(dtype), norm.weight.to(dtype),
            norm.bias.to(dtype), norm.eps, p,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Fused forwards (bound to module instances by `patch`).


_unpad_cache = threading.local()


def _key_padding_mask(attention_mask: Any, batch: int, seqlen: int) -> torch.Tensor | None:
    """The (B, L) bool key mask behind the mask transformers hands to attention, None when nothing is masked.

    Encoder masks from create_bidirectional_mask are (B, 1, L or 1, L): bool (True = attend) for sdpa, additive
    float (0 = attend) for eager; flash-style implementations pass the (B, L) 0/1 mask itself.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, 0, :]
        real = row if row.dtype == torch.bool else row == 0
    else:
        real = attention_mask != 0
    return real.expand(batch, seqlen)


def _unpadded(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(indices, cu_seqlens, max_seqlen) of the real tokens, or None when nothing is padded; computed once per mask
    (every layer gets the same mask tensor), which keeps it to one host synchronisation per forward."""
    cached = getattr(_unpad_cache, "entry", None)
    if cached is not None and cached[0]() is mask:
        return cached[1]
    if bool(mask.all()):
        result = None
    else:
        _, indices, cu_seqlens, max_seqlen = ops.unpad_input(mask[..., None], mask)
        result = (indices, cu_seqlens, max_seqlen)
    _unpad_cache.entry = (weakref.ref(mask), result)
    return result


def self_attention_forward(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch, seqlen = hidden_states.shape[:2]
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    q = self.query(hidden_states).view(batch, seqlen, heads, head_dim)  # (B, L, H, D)
    k = self.key(hidden_states).view(batch, seqlen, heads, head_dim)
    v = self.value(hidden_states).view(batch, seqlen, heads, head_dim)
    dropout_p = self.dropout.p if self.training else 0.0
    if attention_maps_requested(self, kwargs):  # the kernel never forms the probabilities: eager for this call
        out, probabilities = eager_attention(
            self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask, dropout_p, self.scaling
        )
        return out.reshape(batch, seqlen, heads * head_dim), probabilities
    real = _key_padding_mask(attention_mask, batch, seqlen)
    unpad = None
    if real is not None and getattr(self, MARK)["attention"] == "auto" and not torch.compiler.is_compiling():
        unpad = _unpadded(real)
    with _no_autocast(q.device):
        if unpad is None:
            out = ops.attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), real, dropout_p, self.scaling
            ).transpose(1, 2)  # (B, L, H, D)
        else:
            indices, cu_seqlens, max_seqlen = unpad
            packed = [t.reshape(batch * seqlen, heads, head_dim).index_select(0, indices) for t in (q, k, v)]
            out = ops.attention_varlen(*packed, cu_seqlens, max_seqlen, dropout_p, self.scaling)
            out = ops.pad_input(out, indices, batch, seqlen)  # (B, L, H, D)
    return out.reshape(batch, seqlen, heads * head_dim), None


def residual_output_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    return _layer_norm(self, self.LayerNorm, self.dense(hidden_states), input_tensor, self.dropout)


def intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _gelu_linear(self, self.dense, self.intermediate_act_fn, hidden_states)


def discriminator_predictions_forward(
    self, discriminator_hidden_states: torch.Tensor, labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits, or with `labels` (loss, logits) through the fused RTD loss."""
    hidden = _gelu_linear(self, self.dense, self.activation, discriminator_hidden_states)
    if labels is None or not getattr(self, MARK).get("rtd_loss"):
        logits = self.dense_prediction(hidden).squeeze(-1)
        return logits if labels is None else (_hf_rtd_loss(logits, labels, attention_mask), logits)
    hidden, weight, bias = _linear_inputs(hidden, self.dense_prediction)
    mask = None if attention_mask is None else attention_mask.view(labels.shape)
    with _no_autocast(hidden.device):
        return ops.rtd_loss(hidden, weight, bias, labels, mask, return_logits=True)


def _hf_rtd_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return F.binary_cross_entropy_with_logits(logits.view(labels.shape), labels.float())
    active = attention_mask.view(labels.shape) == 1
    return F.binary_cross_entropy_with_logits(logits.view(labels.shape)[active], labels[active].float())


def generator_predictions_forward(self, generator_hidden_states: torch.Tensor) -> torch.Tensor:
    hidden = _gelu_linear(self, self.dense, self.activation, generator_hidden_states)
    return _layer_norm(self, self.LayerNorm, hidden, None, None)


def prediction_transform_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # BertPredictionHeadTransform
    hidden = _gelu_linear(self, self.dense, self.transform_act_fn, hidden_states)
    return _layer_norm(self, self.LayerNorm, hidden, None, None)


def roberta_lm_head_forward(self, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    hidden = _gelu_linear(self, self.dense, roberta.gelu, features)
    return self.decoder(_layer_norm(self, self.layer_norm, hidden, None, None))


def classification_head_forward(self, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    x = self.dropout(features[:, 0, :])
    x = self.dropout(_gelu_linear(self, self.dense, self.activation, x))
    return self.out_proj(x)


def lm_head_forward(
    self, input: torch.Tensor, labels: torch.Tensor | None = None, return_logits: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear's forward; with `labels`, (fused MLM loss, logits or None) instead."""
    if labels is None:
        return F.linear(input, self.weight, self.bias)
    hidden, weight, bias = _linear_inputs(input, self)
    with _no_autocast(hidden.device):
        if return_logits:
            return ops.mlm_loss(hidden, weight, bias, labels, return_logits=True)
        return ops.mlm_loss(hidden, weight, bias, labels), None


# The head-level forwards keep transformers' signatures and annotations (`**kwargs: Unpack[TransformersKwargs]`):
# transformers' own tests and Trainer read them to learn what a model accepts and can return.


@can_return_tuple
def pretraining_forward(
    self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor] | electra.ElectraForPreTrainingOutput:
    """ElectraForPreTraining.forward with the RTD loss fused into the discriminator head."""
    outputs = self.electra(
        input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
        inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
    )
    loss = None
    if labels is None:
        logits = self.discriminator_predictions(outputs[0])
    else:
        loss, logits = self.discriminator_predictions(outputs[0], labels=labels, attention_mask=attention_mask)
    return electra.ElectraForPreTrainingOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


@can_return_tuple
def masked_lm_forward(
    self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, *, skip_logits: bool | None = None,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor] | electra.MaskedLMOutput:
    """ElectraForMaskedLM.forward with the fused MLM loss; `skip_logits` defaults to `self.training and labels`."""
    outputs = self.electra(
        input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
        inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
    )
    hidden = self.generator_predictions(outputs[0])
    if skip_logits is None:
        skip_logits = self.training and labels is not None
    loss = None
    if labels is None:
        logits = self.generator_lm_head(hidden)
    else:
        loss, logits = self.generator_lm_head(hidden, labels=labels, return_logits=not skip_logits)
    return electra.MaskedLMOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )
