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

- attention: `*SelfAttention` -> one QKV GEMM (the three weights concatenated in the forward) and
  electra_triton.ops.attention_qkvpacked (padding mask as a key mask), and the base model (ElectraModel, BertModel,
  RobertaModel) -> `encoder.encoder_forward`, which unpads once per forward and runs every layer on the real tokens
  through attention_varlen_qkvpacked when the batch is padded enough or packed (see encoder.py for the rule and
  where the plan comes from; `unpad_plan=` is a forward keyword of every head). `attention="padded"` keeps the
  padded layout always. On the unpadded path the outputs at padding positions (attention_mask == 0) are zeros, not
  HF's (HF lets padding queries attend to the real keys; no loss should read them); every real position is the same.
- gelu_linear: dense + GELU of `*Intermediate`, ElectraDiscriminatorPredictions, ElectraGeneratorPredictions,
  ElectraClassificationHead, BertPredictionHeadTransform, RobertaLMHead -> electra_triton.ops.gelu_linear.
- layer_norm: dense -> dropout -> +residual -> LayerNorm of `*SelfOutput` / `*Output`, and the LayerNorms of the
  prediction heads -> electra_triton.ops.dropout_add_layer_norm; the embeddings (gathers, sum, LayerNorm, dropout)
  -> electra_triton.ops.embeddings_layer_norm (see integration/embeddings.py).
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
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.models.bert import modeling_bert as bert
from transformers.models.electra import modeling_electra as electra
from transformers.models.roberta import modeling_roberta as roberta

from .forwards import MARK, with_transformers_signature
from .plan import plan

FLAGS = ("attention", "gelu_linear", "layer_norm", "rtd_loss", "mlm_loss")
SUPPORTED_MODELS = (electra.ElectraPreTrainedModel, bert.BertPreTrainedModel, roberta.RobertaPreTrainedModel)
_INSTANCE_ATTRIBUTES = ("forward", "extra_repr", MARK)


def _bind(module: nn.Module, forward: Callable, fused: dict[str, Any]) -> None:
    # Re-patching (idempotence, or a different flag set) starts from the module's own class methods.
    _restore(module)
    setattr(module, MARK, fused)
    if isinstance(module, PreTrainedModel):  # what users, Trainer and transformers' tests inspect
        forward = with_transformers_signature(type(module).forward, forward)
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
    again (with the same or other flags) re-plans from transformers' own forwards. `attention` may be True (the
    encoder unpads padded batches once per forward), "padded" (the padded layout always) or False. Raises
    TypeError for anything that is not an
    ELECTRA, BERT or RoBERTa model from transformers; warns once for configurations left on transformers' path.
    """
    _check_model(model, "patch")
    if attention not in (True, False, "padded"):
        raise ValueError(f"attention must be True, False or 'padded', got {attention!r}")
    flags = {"attention": attention, "gelu_linear": gelu_linear, "layer_norm": layer_norm, "rtd_loss": rtd_loss,
             "mlm_loss": mlm_loss}
    unpatch(model)
    bindings, skipped = plan(model, flags)
    for module, forward, fused in bindings:
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
        if MARK in module.__dict__:
            _restore(module)
    return model


def fused_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: what is fused there} for a patched model (empty when nothing is)."""
    return {name: dict(module.__dict__[MARK]) for name, module in model.named_modules() if MARK in module.__dict__}


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
