"""The fused forwards that `patch` binds to module instances, by module kind, and the dtype rules they share.

Each reads its own module's parameters inside its own forward (what FSDP's per-module unsharding and DDP's hooks
need) and what is fused there from the module's MARK attribute, set by `patch`.
"""

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.electra import modeling_electra as electra
from transformers.models.roberta import modeling_roberta as roberta
from transformers.utils.generic import can_return_tuple

from .. import ops

MARK = "_electra_triton"  # instance attribute of a patched module: {what is fused there: how}


# ---------------------------------------------------------------------------------------------------------------------
# Dtypes: the ops take matching dtypes, so cast as transformers' modules would under autocast.


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device`, or None outside autocast."""
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
    """LayerNorm(dropout(x) + residual), fused when the module's layer_norm flag is on.

    Under autocast the fused path keeps the activations in the autocast dtype (fp32 weight, bias and statistics):
    the residual stream stays 16-bit, where transformers runs LayerNorm in fp32 and so makes it fp32 (README).
    """
    p = dropout.p if dropout is not None and module.training else 0.0
    if not getattr(module, MARK).get("layer_norm"):
        x = dropout(x) if dropout is not None else x
        return norm(x if residual is None else x + residual)
    dtype = _autocast_dtype(x.device)
    if dtype is None:
        same = residual is None or residual.dtype == x.dtype  # (promote_types is an op to a dispatch mode)
        dtype = x.dtype if same else torch.promote_types(x.dtype, residual.dtype)
        weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
    else:
        weight, bias = norm.weight, norm.bias
    with _no_autocast(x.device):
        return ops.dropout_add_layer_norm(x.to(dtype), None if residual is None else residual.to(dtype), weight, bias,
                                          norm.eps, p)


# ---------------------------------------------------------------------------------------------------------------------
# Fused forwards (bound to module instances by `patch`).


def _key_padding_mask(attention_mask: Any, batch: int, seqlen: int) -> torch.Tensor | None:
    """The (B, L) bool key mask behind the mask the layer got, None when nothing is masked.

    The patched encoder passes the (B, L) bool mask itself; transformers' own encoder forward (the fallback for
    output_attentions) passes create_bidirectional_mask's (B, 1, L or 1, L): bool (True = attend) for sdpa, additive
    float (0 = attend) for eager.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, 0, :]
        real = row if row.dtype == torch.bool else row == 0
    else:
        real = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return real.expand(batch, seqlen)


def _packed_qkv_projection(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """One GEMM for q, k and v: the three Linear weights concatenated in the forward (parameters unchanged)."""
    weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
    bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
    dtype = _autocast_dtype(hidden_states.device)
    if dtype is not None:  # one cast of the concatenated weight, not three
        hidden_states, weight, bias = hidden_states.to(dtype), weight.to(dtype), bias.to(dtype)
    with _no_autocast(hidden_states.device):
        return F.linear(hidden_states, weight, bias)


def self_attention_forward(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
    unpad_plan: ops.UnpadPlan | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Fused QKV GEMM + attention. hidden_states (B, L, hidden) with a key mask, or the real tokens (T, hidden) of
    the patched encoder's `unpad_plan` (then varlen attention, each sequence to itself)."""
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    qkv = _packed_qkv_projection(self, hidden_states)
    dropout_p = self.dropout.p if self.training else 0.0
    with _no_autocast(qkv.device):
        if unpad_plan is not None:
            tokens = hidden_states.shape[0]
            out = ops.attention_varlen_qkvpacked(qkv.view(tokens, 3, heads, head_dim), unpad_plan.cu_seqlens,
                                                 unpad_plan.max_seqlen, dropout_p, self.scaling)
            return out.reshape(tokens, heads * head_dim), None
        batch, seqlen = hidden_states.shape[:2]
        real = _key_padding_mask(attention_mask, batch, seqlen)
        out = ops.attention_qkvpacked(qkv.view(batch, seqlen, 3, heads, head_dim), real, dropout_p, self.scaling)
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


@can_return_tuple
def pretraining_forward(
    self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs: Any,
) -> electra.ElectraForPreTrainingOutput:
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
    inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, skip_logits: bool | None = None,
    **kwargs: Any,
) -> electra.MaskedLMOutput:
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
