"""Drop-in fused kernels for Hugging Face ELECTRA (and the BERT / RoBERTa models that share its blocks).

    model = ElectraForPreTraining.from_pretrained(path)
    electra_triton.patch(model)          # in place; same parameters, state_dict keys, shapes and dtypes
    electra_triton.unpatch(model)        # back to transformers' own computation

`patch` swaps `forward` (and `extra_repr`, so `print(model)` shows what is fused) on the *instances* of the modules it
fuses, through types.MethodType; it never touches a transformers class or another model, and `unpatch` deletes those
instance attributes again. Every fused forward calls `electra_triton.ops` with the module's own parameters, read
inside that module's forward, so FSDP's per-module unsharding and DDP's gradient hooks see them as usual. The losses
go through the submodule that owns the projection (`discriminator_predictions`, `generator_lm_head`) for that reason.

What each flag fuses:

- attention: `*SelfAttention` -> electra_triton.ops.attention (padding mask as a key mask), or, when the batch is
  padded and the model is not being compiled, attention_varlen on the real tokens only (`attention="padded"` keeps
  the padded kernel always). On the unpadded path the outputs at padding positions (attention_mask == 0) are not
  HF's (HF lets padding queries attend to the real keys; no loss should read them); every real position is the same.
- gelu_linear: dense + GELU of `*Intermediate`, ElectraDiscriminatorPredictions, ElectraGeneratorPredictions,
  ElectraClassificationHead, BertPredictionHeadTransform, RobertaLMHead -> electra_triton.ops.gelu_linear.
- layer_norm: dense -> dropout -> +residual -> LayerNorm of `*SelfOutput` / `*Output`, and the LayerNorms of the
  prediction heads -> electra_triton.ops.dropout_add_layer_norm.
- rtd_loss: ElectraForPreTraining(labels=...) -> electra_triton.ops.rtd_loss (HF's masking rule).
- mlm_loss: ElectraForMaskedLM(labels=...) -> electra_triton.ops.mlm_loss, the masked positions only. Logits are
  then skipped in train() (`outputs.logits is None`) and returned in eval(); pass `skip_logits=False` / `True` to the
  model's forward to choose.

What the kernels cannot serve stays on transformers' path, with one warning naming it: decoders / cross-attention,
head dims other than 32 / 64 / 128, position_embedding_type other than "absolute", activations other than the GELUs.
"""

import functools
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations
from transformers.models.bert import modeling_bert as bert
from transformers.models.electra import modeling_electra as electra
from transformers.models.roberta import modeling_roberta as roberta
from transformers.utils.generic import can_return_tuple

from . import ops
from .ops.attention import HEAD_DIMS as ATTENTION_HEAD_DIMS

FLAGS = ("attention", "gelu_linear", "layer_norm", "rtd_loss", "mlm_loss")
SUPPORTED_MODELS = (electra.ElectraPreTrainedModel, bert.BertPreTrainedModel, roberta.RobertaPreTrainedModel)
_MARK = "_electra_triton"  # instance attribute of a patched module: what is fused there
_INSTANCE_ATTRIBUTES = ("forward", "extra_repr", _MARK)

_SELF_ATTENTION = (electra.ElectraSelfAttention, bert.BertSelfAttention, roberta.RobertaSelfAttention)
_RESIDUAL_OUTPUT = (
    electra.ElectraSelfOutput, electra.ElectraOutput, bert.BertSelfOutput, bert.BertOutput,
    roberta.RobertaSelfOutput, roberta.RobertaOutput,
)
_INTERMEDIATE = (electra.ElectraIntermediate, bert.BertIntermediate, roberta.RobertaIntermediate)


def _gelu_approximate(activation: Any) -> str | None:
    """The `approximate` argument of ops.gelu_linear equal to this HF activation, or None if it is not a GELU."""
    if isinstance(activation, nn.GELU):
        return activation.approximate
    if isinstance(activation, activations.GELUActivation):
        return "none"
    # gelu_new is 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))): the same function as PyTorch's tanh GELU.
    if isinstance(activation, (activations.NewGELUActivation, activations.GELUTanh)):
        return "tanh"
    return None


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
    approximate = getattr(module, _MARK).get("gelu_linear")
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
    if not getattr(module, _MARK).get("layer_norm"):
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


def _self_attention_forward(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch, seqlen = hidden_states.shape[:2]
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    q = self.query(hidden_states).view(batch, seqlen, heads, head_dim)  # (B, L, H, D)
    k = self.key(hidden_states).view(batch, seqlen, heads, head_dim)
    v = self.value(hidden_states).view(batch, seqlen, heads, head_dim)
    dropout_p = self.dropout.p if self.training else 0.0
    real = _key_padding_mask(attention_mask, batch, seqlen)
    unpad = None
    if real is not None and getattr(self, _MARK)["attention"] == "auto" and not torch.compiler.is_compiling():
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


def _residual_output_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    return _layer_norm(self, self.LayerNorm, self.dense(hidden_states), input_tensor, self.dropout)


def _intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _gelu_linear(self, self.dense, self.intermediate_act_fn, hidden_states)


def _discriminator_predictions_forward(
    self, discriminator_hidden_states: torch.Tensor, labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits, or with `labels` (loss, logits) through the fused RTD loss."""
    hidden = _gelu_linear(self, self.dense, self.activation, discriminator_hidden_states)
    if labels is None or not getattr(self, _MARK).get("rtd_loss"):
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


def _generator_predictions_forward(self, generator_hidden_states: torch.Tensor) -> torch.Tensor:
    hidden = _gelu_linear(self, self.dense, self.activation, generator_hidden_states)
    return _layer_norm(self, self.LayerNorm, hidden, None, None)


def _prediction_transform_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # BertPredictionHeadTransform
    hidden = _gelu_linear(self, self.dense, self.transform_act_fn, hidden_states)
    return _layer_norm(self, self.LayerNorm, hidden, None, None)


def _roberta_lm_head_forward(self, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    hidden = _gelu_linear(self, self.dense, roberta.gelu, features)
    return self.decoder(_layer_norm(self, self.layer_norm, hidden, None, None))


def _classification_head_forward(self, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    x = self.dropout(features[:, 0, :])
    x = self.dropout(_gelu_linear(self, self.dense, self.activation, x))
    return self.out_proj(x)


def _lm_head_forward(
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
def _pretraining_forward(
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
def _masked_lm_forward(
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


# ---------------------------------------------------------------------------------------------------------------------
# patch / unpatch


def _bind(module: nn.Module, forward: Callable, fused: dict[str, Any]) -> None:
    # Re-patching (idempotence, or a different flag set) starts from the module's own class methods.
    _restore(module)
    setattr(module, _MARK, fused)
    module.forward = types.MethodType(forward, module)
    original_repr = type(module).extra_repr
    summary = ", ".join(k if v is True else f"{k}={v}" for k, v in fused.items())

    def extra_repr(self) -> str:
        text = original_repr(self)
        return f"{text}, electra_triton: {summary}" if text else f"electra_triton: {summary}"

    module.extra_repr = types.MethodType(extra_repr, module)


def _restore(module: nn.Module) -> None:
    for name in _INSTANCE_ATTRIBUTES:
        module.__dict__.pop(name, None)


def _attention_problem(config: Any, head_dim: int) -> str | None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "decoder / cross-attention configs (is_decoder, add_cross_attention)"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type!r} (only 'absolute')"
    if head_dim not in ATTENTION_HEAD_DIMS:
        return f"head dim {head_dim} (the kernel takes {ATTENTION_HEAD_DIMS})"
    return None


def _plan(model: nn.Module, flags: dict[str, Any]) -> tuple[list[tuple[nn.Module, Callable, dict]], list[str]]:
    """What to bind where, and what stays on transformers' path and why."""
    config = model.config
    plan, skipped = [], []

    def gelu(activation: Any, where: str) -> str | None:
        if not flags["gelu_linear"]:
            return None
        approximate = _gelu_approximate(activation)
        if approximate is None:
            skipped.append(f"gelu_linear in {where}: activation {type(activation).__name__} is not a GELU")
        return approximate

    def layer_norm() -> bool:
        return bool(flags["layer_norm"])

    def add(module: nn.Module, forward: Callable, **fused: Any) -> None:
        fused = {k: v for k, v in fused.items() if v}
        if fused:
            plan.append((module, forward, fused))

    for module in model.modules():
        if isinstance(module, _SELF_ATTENTION) and flags["attention"]:
            problem = _attention_problem(config, module.attention_head_size)
            if problem:
                skipped.append(f"attention: {problem}")
            else:
                mode = "padded" if flags["attention"] == "padded" else "auto"
                add(module, _self_attention_forward, attention=mode)
        elif isinstance(module, _RESIDUAL_OUTPUT):
            add(module, _residual_output_forward, layer_norm=layer_norm())
        elif isinstance(module, _INTERMEDIATE):
            add(module, _intermediate_forward, gelu_linear=gelu(module.intermediate_act_fn, type(module).__name__))
        elif isinstance(module, electra.ElectraDiscriminatorPredictions):
            add(module, _discriminator_predictions_forward, gelu_linear=gelu(module.activation, type(module).__name__),
                rtd_loss=bool(flags["rtd_loss"]))
        elif isinstance(module, electra.ElectraGeneratorPredictions):
            add(module, _generator_predictions_forward, gelu_linear=gelu(module.activation, type(module).__name__),
                layer_norm=layer_norm())
        elif isinstance(module, bert.BertPredictionHeadTransform):
            add(module, _prediction_transform_forward, gelu_linear=gelu(module.transform_act_fn, type(module).__name__),
                layer_norm=layer_norm())
        elif isinstance(module, roberta.RobertaLMHead):
            add(module, _roberta_lm_head_forward, gelu_linear=gelu(roberta.gelu, type(module).__name__),
                layer_norm=layer_norm())
        elif isinstance(module, electra.ElectraClassificationHead):
            add(module, _classification_head_forward, gelu_linear=gelu(module.activation, type(module).__name__))
        elif isinstance(module, electra.ElectraForPreTraining) and flags["rtd_loss"]:
            add(module, _pretraining_forward, rtd_loss=True)
        elif isinstance(module, electra.ElectraForMaskedLM) and flags["mlm_loss"]:
            add(module, _masked_lm_forward, mlm_loss=True)
            add(module.generator_lm_head, _lm_head_forward, mlm_loss=True)
    return plan, sorted(set(skipped))


def _check_model(model: object, caller: str) -> None:
    if not isinstance(model, SUPPORTED_MODELS):
        raise TypeError(
            f"electra_triton.{caller} takes a transformers ELECTRA, BERT or RoBERTa model (ElectraModel, "
            f"ElectraForPreTraining, BertModel, RobertaForMaskedLM, ...), got {type(model).__name__}"
        )


def patch(
    model: nn.Module, *, attention: bool | str = True, gelu_linear: bool = True, layer_norm: bool = True,
    rtd_loss: bool = True, mlm_loss: bool = True,
) -> nn.Module:
    """Swap electra_triton's fused ops into `model` in place and return it (see the module docstring).

    Parameters, state_dict keys, shapes and dtypes are unchanged, and so is every other model. Idempotent: patching
    again (with the same or other flags) re-plans from transformers' own forwards. `attention` may be True (varlen
    on padded batches), "padded" (the padded kernel always) or False. Raises TypeError for anything that is not an
    ELECTRA, BERT or RoBERTa model from transformers; warns once for configurations left on transformers' path.
    """
    _check_model(model, "patch")
    if attention not in (True, False, "padded"):
        raise ValueError(f"attention must be True, False or 'padded', got {attention!r}")
    flags = {"attention": attention, "gelu_linear": gelu_linear, "layer_norm": layer_norm, "rtd_loss": rtd_loss,
             "mlm_loss": mlm_loss}
    unpatch(model)
    plan, skipped = _plan(model, flags)
    for module, forward, fused in plan:
        _bind(module, forward, fused)
    if skipped:
        warnings.warn(
            f"electra_triton.patch({type(model).__name__}): left on transformers' path: " + "; ".join(skipped),
            stacklevel=2,
        )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: every module computes with transformers' own forward again. Returns the model."""
    _check_model(model, "unpatch")
    for module in model.modules():
        if _MARK in module.__dict__:
            _restore(module)
    return model


def fused_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: what is fused there} for a patched model (empty when nothing is)."""
    return {name: dict(module.__dict__[_MARK]) for name, module in model.named_modules() if _MARK in module.__dict__}


# ---------------------------------------------------------------------------------------------------------------------
# Class-level: patch every supported model as it is built (before from_pretrained), Liger style.


_applied: dict[type, Callable] = {}
_building = threading.local()


def _model_classes() -> list[type]:
    classes = []
    for module in (electra, bert, roberta):
        for name in module.__all__:
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, SUPPORTED_MODELS) and cls not in SUPPORTED_MODELS:
                classes.append(cls)
    return classes


def apply_to_transformers(
    *, attention: bool | str = True, gelu_linear: bool = True, layer_norm: bool = True, rtd_loss: bool = True,
    mlm_loss: bool = True,
) -> None:
    """Patch every ELECTRA / BERT / RoBERTa model built from now on (from_pretrained, from_config, the constructor)
    with these flags, by wrapping the model classes' __init__. Undo with `revert_transformers()`; models already
    built keep their patch (call `unpatch` on them)."""
    flags = {"attention": attention, "gelu_linear": gelu_linear, "layer_norm": layer_norm, "rtd_loss": rtd_loss,
             "mlm_loss": mlm_loss}
    revert_transformers()
    for cls in _model_classes():
        _applied[cls] = cls.__init__
        cls.__init__ = _patching_init(cls.__init__, flags)


def _patching_init(original: Callable, flags: dict[str, Any]) -> Callable:
    @functools.wraps(original)
    def init(self, *args: Any, **kwargs: Any) -> None:
        # Heads build their base model inside their own __init__: patch once, when the outermost one is done.
        depth = getattr(_building, "depth", 0)
        _building.depth = depth + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _building.depth = depth
        if depth == 0:
            patch(self, **flags)

    return init


def revert_transformers() -> None:
    """Undo `apply_to_transformers`: the model classes' own __init__ again."""
    for cls, original in _applied.items():
        cls.__init__ = original
    _applied.clear()
