"""The fused forwards that `patch` binds to module instances, by module kind, and the dtype rules they share.

Each reads its own module's parameters inside its own forward (what FSDP's per-module unsharding and DDP's hooks
need) and what is fused there from the module's MARK attribute, set by `patch`.
"""

import inspect
from collections.abc import Callable
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
from .attention_backend import ATTENTION_MAPS, attention_maps_requested, eager_attention

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


def _packed(dtype: torch.dtype, *groups: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """Each group concatenated (dim 0) in `dtype`, all cast in one multi-tensor launch (ops.pack_parameters); a group
    holding a None (a Linear without bias) comes back as None."""
    wanted = [group for group in groups if None not in group]
    packed = iter(ops.pack_parameters(wanted, dtype) if wanted else ())
    return tuple(None if None in group else next(packed) for group in groups)


def _linear_inputs(x: torch.Tensor, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, weight, bias in the dtype nn.Linear would compute in (the autocast dtype under autocast; weight and bias
    cast in one launch)."""
    dtype = _autocast_dtype(x.device)
    if dtype is None:
        return x, linear.weight, linear.bias
    return (x.to(dtype), *_packed(dtype, [linear.weight], [linear.bias]))


def _linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward, its parameters cast in one launch under autocast (`_linear_inputs`)."""
    x, weight, bias = _linear_inputs(x, linear)
    return ops.linear(x, weight, bias)


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
    if not getattr(module, MARK).get("layer_norm"):
        x = dropout(x) if dropout is not None else x
        return norm(x if residual is None else x + residual)
    return _fused_layer_norm(norm, x, residual, dropout.p if dropout is not None and module.training else 0.0)


def _fused_layer_norm(
    norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None, p: float,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) by ops.dropout_add_layer_norm. Under autocast its parameters (and
    x_bias, the bias of the linear layer that produced x) stay fp32: no casts."""
    dtype = _autocast_dtype(x.device)
    if dtype is None:
        same = residual is None or residual.dtype == x.dtype  # (promote_types is an op to a dispatch mode)
        dtype = x.dtype if same else torch.promote_types(x.dtype, residual.dtype)
        weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
        x_bias = None if x_bias is None else x_bias.to(dtype)
    else:
        weight, bias = norm.weight, norm.bias
    with _no_autocast(x.device):
        return ops.dropout_add_layer_norm(x.to(dtype), None if residual is None else residual.to(dtype), weight, bias,
                                          norm.eps, p, x_bias=x_bias)


def _dense_layer_norm(
    module: nn.Module, dense: nn.Linear, norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor,
    dropout: nn.Module, weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(dense(x)) + residual) with the dense layer's bias added inside the fused LayerNorm (fp32,
    its gradient from the LayerNorm's backward: no column-sum pass, no bias cast). `weight`: the dense weight already
    cast (the fused layer's), else cast here."""
    if weight is None:
        dtype = _compute_dtype(x, dense)
        (weight,) = _packed(dtype, [dense.weight])
        x = x.to(dtype)
    p = dropout.p if module.training else 0.0
    return _fused_layer_norm(norm, ops.linear(x, weight), residual, p, dense.bias)


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


def _has_query_rows(attention_mask: Any) -> bool:
    """A 4D mask with a row per query (user-built): not a key-padding mask, which the kernels take."""
    return attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1


def _qkv_parameters(self) -> list[list[torch.Tensor | None]]:
    """The groups (`_packed`) of one (3 * hidden, hidden) q/k/v weight and its bias (parameters unchanged)."""
    return [[self.query.weight, self.key.weight, self.value.weight], [self.query.bias, self.key.bias, self.value.bias]]


def _compute_dtype(x: torch.Tensor, linear: nn.Linear) -> torch.dtype:
    """What a Linear computes in: the autocast dtype under autocast, else its weight's."""
    return _autocast_dtype(x.device) or linear.weight.dtype


def _packed_qkv_projection(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """One GEMM for q, k and v: the three Linear weights concatenated (and cast) in one launch."""
    dtype = _compute_dtype(hidden_states, self.query)
    weight, bias = _packed(dtype, *_qkv_parameters(self))
    return ops.linear(hidden_states.to(dtype), weight, bias)


def _fused_attention(
    self, qkv: torch.Tensor, attention_mask: Any, unpad_plan: ops.UnpadPlan | None,
) -> torch.Tensor:
    """The attention kernel on a packed qkv: (T, 3 * hidden) varlen with `unpad_plan`, else (B, L, 3 * hidden) with
    a key-padding mask. Returns (T or B, L, hidden)."""
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    dropout_p = self.dropout.p if self.training else 0.0
    with _no_autocast(qkv.device):
        if unpad_plan is not None:
            tokens = qkv.shape[0]
            out = ops.attention_varlen_qkvpacked(qkv.view(tokens, 3, heads, head_dim), unpad_plan.cu_seqlens,
                                                 unpad_plan.max_seqlen, dropout_p, self.scaling)
            return out.reshape(tokens, heads * head_dim)
        batch, seqlen = qkv.shape[:2]
        real = _key_padding_mask(attention_mask, batch, seqlen)
        out = ops.attention_qkvpacked(qkv.view(batch, seqlen, 3, heads, head_dim), real, dropout_p, self.scaling)
    return out.reshape(batch, seqlen, heads * head_dim)


def self_attention_forward(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
    unpad_plan: ops.UnpadPlan | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Fused QKV GEMM + attention. hidden_states (B, L, hidden) with a key mask, or the real tokens (T, hidden) of
    the patched encoder's `unpad_plan` (then varlen attention, each sequence to itself)."""
    qkv = _packed_qkv_projection(self, hidden_states)
    # Transformers' eager attention, exact, for this call when the kernel cannot serve it: attention maps requested
    # (it never forms them), or a 4D mask with a row per query (user-built: not a key-padding mask). transformers'
    # own encoder forward runs then, so the layout is padded and the mask is transformers'.
    maps = attention_maps_requested(self, kwargs)
    general_mask = _has_query_rows(attention_mask)
    if unpad_plan is None and (maps or general_mask):
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        batch, seqlen = hidden_states.shape[:2]
        q, k, v = qkv.view(batch, seqlen, 3, heads, head_dim).transpose(1, 3).unbind(2)  # (B, H, L, D) each
        reason = ATTENTION_MAPS if maps else "a 4D attention mask is given"
        dropout_p = self.dropout.p if self.training else 0.0
        out, probabilities = eager_attention(self, q, k, v, attention_mask, dropout_p, self.scaling, reason=reason)
        return out.reshape(batch, seqlen, heads * head_dim), probabilities
    return _fused_attention(self, qkv, attention_mask, unpad_plan), None


def residual_output_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    if not getattr(self, MARK).get("layer_norm"):
        return _layer_norm(self, self.LayerNorm, _linear(self.dense, hidden_states), input_tensor, self.dropout)
    return _dense_layer_norm(self, self.dense, self.LayerNorm, hidden_states, input_tensor, self.dropout)


def layer_forward(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
    unpad_plan: ops.UnpadPlan | None = None, **kwargs: Any,
) -> torch.Tensor:
    """A whole encoder layer (ElectraLayer, BertLayer, RobertaLayer) whose attention, LayerNorms and FFN are all
    fused: every parameter of the layer cast (and q/k/v packed) in one launch, and the residual stream's two
    gradients folded into the dX GEMMs of the QKV projection and of the FFN's first GEMM (`return_residual`) instead
    of two (tokens, hidden) adds per layer. Transformers' layer forward (over the fused modules) serves what this
    does not: attention maps, a 4D row-wise mask, cross-attention or cache arguments. A chunked feed-forward
    (`chunk_size_feed_forward`, transformers' memory saver: the same values) runs in one piece: transformers' chunks
    along dim 1, which is the hidden dim of the unpadded (tokens, hidden) layout.
    """
    attention = self.attention.self
    # (transformers' own encoder passes encoder_hidden_states positionally, None for an encoder)
    if (any(arg is not None for arg in args) or _has_query_rows(attention_mask)
            or attention_maps_requested(attention, kwargs)
            or any(kwargs.get(name) is not None for name in _STOCK_LAYER_KEYWORDS)):
        if unpad_plan is not None:
            kwargs[PLAN_KEYWORD] = unpad_plan
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    attention_output, output = self.attention.output, self.output
    dtype = _compute_dtype(hidden_states, attention.query)
    # (the output projections' biases are added, in fp32, by the LayerNorms after them: not cast)
    w_qkv, b_qkv, w_o, w_in, b_in, w_out = _packed(
        dtype, *_qkv_parameters(attention), [attention_output.dense.weight], [self.intermediate.dense.weight],
        [self.intermediate.dense.bias], [output.dense.weight])
    qkv, residual = ops.linear(hidden_states.to(dtype), w_qkv, b_qkv, return_residual=True)
    context = _fused_attention(attention, qkv, attention_mask, unpad_plan)
    hidden = _dense_layer_norm(attention_output, attention_output.dense, attention_output.LayerNorm, context,
                               residual, attention_output.dropout, w_o)
    with _no_autocast(hidden.device):
        approximate = getattr(self.intermediate, MARK)["gelu_linear"]
        inner, residual = ops.gelu_linear(hidden, w_in, b_in, approximate, return_residual=True)
    return _dense_layer_norm(output, output.dense, output.LayerNorm, inner, residual, output.dropout, w_out)


PLAN_KEYWORD = "unpad_plan"
# What transformers' layer forward takes beyond a self-attention encoder layer's inputs (decoders, caches).
_STOCK_LAYER_KEYWORDS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values",
                         "cache_position")


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

_presented: dict[tuple[Callable, Callable], Callable] = {}


def with_transformers_signature(stock: Callable, fused: Callable) -> Callable:
    """`fused` as a forward with `stock`'s signature, annotations and positional order (a model class's own forward),
    plus `fused`'s extra named parameters as keyword-only ones. Positional arguments reach `fused` by their names in
    `stock`, so a fused forward may take what it does not handle itself through **kwargs. One per (stock, fused)."""
    if (stock, fused) in _presented:
        return _presented[(stock, fused)]
    theirs = inspect.signature(stock)
    names = list(theirs.parameters)[1:]  # without self
    named = [p for p in theirs.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [p.replace(kind=p.KEYWORD_ONLY) for name, p in inspect.signature(fused).parameters.items()
             if name not in theirs.parameters and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    var_keyword = [p for p in theirs.parameters.values() if p.kind is p.VAR_KEYWORD]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(names):
            raise TypeError(f"forward() takes {len(names)} positional arguments but {len(args)} were given")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument '{name}'")
            kwargs[name] = value
        return fused(self, **kwargs)

    forward.__name__, forward.__qualname__, forward.__doc__ = fused.__name__, fused.__qualname__, fused.__doc__
    forward.__signature__ = theirs.replace(parameters=named + extra + var_keyword)
    _presented[(stock, fused)] = forward
    return forward


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
