"""The plan of `patch`: which module kinds get which fused forward, and what stays on transformers' path and why."""

from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import activations
from transformers.models.bert import modeling_bert as bert
from transformers.models.electra import modeling_electra as electra
from transformers.models.roberta import modeling_roberta as roberta

from ..ops.attention import HEAD_DIMS as ATTENTION_HEAD_DIMS
from . import encoder
from . import forwards as fused
from .embeddings import EMBEDDINGS, embeddings_forward

SELF_ATTENTION = (electra.ElectraSelfAttention, bert.BertSelfAttention, roberta.RobertaSelfAttention)
RESIDUAL_OUTPUT = (
    electra.ElectraSelfOutput, electra.ElectraOutput, bert.BertSelfOutput, bert.BertOutput,
    roberta.RobertaSelfOutput, roberta.RobertaOutput,
)
INTERMEDIATE = (electra.ElectraIntermediate, bert.BertIntermediate, roberta.RobertaIntermediate)
LAYER = (electra.ElectraLayer, bert.BertLayer, roberta.RobertaLayer)
BASE_MODELS = (electra.ElectraModel, bert.BertModel, roberta.RobertaModel)


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


def _attention_problem(config: Any, head_dim: int) -> str | None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "decoder / cross-attention configs (is_decoder, add_cross_attention)"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type!r} (only 'absolute')"
    if head_dim not in ATTENTION_HEAD_DIMS:
        return f"head dim {head_dim} (the kernel takes {ATTENTION_HEAD_DIMS})"
    return None


def _activation(module: nn.Module) -> Any:
    """The GELU a module applies after its dense layer (each HF class names it differently)."""
    for name in ("intermediate_act_fn", "activation", "transform_act_fn"):
        if hasattr(module, name):
            return getattr(module, name)
    return roberta.gelu  # RobertaLMHead calls the function directly


# The declared table: module kind -> fused forward -> the flags it serves. The first matching row wins; a module
# whose flags are all off (or unsupported) keeps transformers' forward.
TABLE: list[tuple[tuple[type, ...], Callable, tuple[str, ...]]] = [
    (SELF_ATTENTION, fused.self_attention_forward, ("attention",)),
    (EMBEDDINGS, embeddings_forward, ("layer_norm",)),
    (RESIDUAL_OUTPUT, fused.residual_output_forward, ("layer_norm",)),
    (INTERMEDIATE, fused.intermediate_forward, ("gelu_linear",)),
    ((electra.ElectraDiscriminatorPredictions,), fused.discriminator_predictions_forward, ("gelu_linear", "rtd_loss")),
    ((electra.ElectraGeneratorPredictions,), fused.generator_predictions_forward, ("gelu_linear", "layer_norm")),
    ((bert.BertPredictionHeadTransform,), fused.prediction_transform_forward, ("gelu_linear", "layer_norm")),
    ((roberta.RobertaLMHead,), fused.roberta_lm_head_forward, ("gelu_linear", "layer_norm")),
    ((electra.ElectraClassificationHead,), fused.classification_head_forward, ("gelu_linear",)),
    ((electra.ElectraForPreTraining,), fused.pretraining_forward, ("rtd_loss",)),
    ((electra.ElectraForMaskedLM,), fused.masked_lm_forward, ("mlm_loss",)),
    # The LM head itself: nn.Linear, so matched through its parent above (see `plan`).
]


def plan(model: nn.Module, flags: dict[str, Any]) -> tuple[list[tuple[nn.Module, Callable, dict]], list[str]]:
    """What to bind where ((module, forward, {flag: how}) per module), and what stays on transformers' path, why."""
    config = model.config
    bindings, skipped = [], []

    def how(module: nn.Module, flag: str) -> Any:
        """What `flag` fuses in `module`: a truthy value, or None (off, or not servable: then `skipped` says why)."""
        if not flags[flag]:
            return None
        if flag == "attention":
            problem = _attention_problem(config, module.attention_head_size)
            if problem:
                skipped.append(f"attention: {problem}")
                return None
            return "padded" if flags["attention"] == "padded" else "auto"
        if flag == "gelu_linear":
            activation = _activation(module)
            approximate = _gelu_approximate(activation)
            if approximate is None:
                skipped.append(f"gelu_linear in {type(module).__name__}: activation {type(activation).__name__} is "
                               "not a GELU")
            return approximate
        return True

    for module in model.modules():
        if isinstance(module, LAYER):
            continue  # bound below, once its parts' bindings are known
        if isinstance(module, BASE_MODELS):
            # Always bound, so that `unpad_plan=` is either served (fused attention: the encoder unpads once) or
            # refused with an error, never silently ignored (packed rows would attend across sequences).
            attention = next((m for m in module.modules() if isinstance(m, SELF_ATTENTION)), None)
            mode = (how(attention, "attention") if attention is not None else None) or "transformers"
            bindings.append((module, encoder.encoder_forward, {"encoder": mode}))
            continue
        row = next((row for row in TABLE if isinstance(module, row[0])), None)
        if row is None:
            continue
        classes, forward, served = row
        fused_here = {flag: value for flag in served if (value := how(module, flag))}
        if fused_here:
            bindings.append((module, forward, fused_here))
            if forward is fused.masked_lm_forward:
                bindings.append((module.generator_lm_head, fused.lm_head_forward, {"mlm_loss": True}))
    # A layer whose attention, both residual LayerNorms and FFN GELU are all fused runs as one fused forward.
    fused_here = {id(module): how for module, _, how in bindings}
    for layer in model.modules():
        if isinstance(layer, LAYER) and all(
                fused_here.get(id(part), {}).get(flag) for part, flag in (
                    (layer.attention.self, "attention"), (layer.attention.output, "layer_norm"),
                    (layer.intermediate, "gelu_linear"), (layer.output, "layer_norm"))):
            bindings.append((layer, fused.layer_forward, {"layer": True}))
    return bindings, sorted(set(skipped))
