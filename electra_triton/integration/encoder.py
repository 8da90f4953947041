"""The patched encoder: embeddings, then every layer on the real tokens only, unpadded once per forward.

`encoder_forward` replaces the forward of ElectraModel / BertModel / RobertaModel (the base model inside every head
class). When the batch is padded (or packs several sequences into a row) it gathers the embeddings' output to
(total_tokens, hidden) once, runs every layer there (fused QKV GEMM, varlen attention, output GEMM, LayerNorms,
FFN), and scatters the result back to transformers' padded (B, L, hidden) layout once at the end. The layers get the
plan (`unpad_plan=`, an `ops.UnpadPlan`) as a forward keyword, so gradient checkpointing's recompute sees the same
one. Under autocast the embeddings' output is cast to the autocast dtype once: the residual stream stays there.

Where the plan comes from, in order: the caller's `unpad_plan=` (built on the CPU in the data loader: no host
synchronisation at all); transformers' packed-sequence keywords `cu_seq_lens_q` / `max_length_q`
(DataCollatorWithFlattening); a one-row batch with `position_ids` and no mask (packed by position ids restarting
at their minimum: 0, or a RoBERTa-style start; eager only); the attention mask. The last two cost one host
synchronisation (the token count) in eager mode. Under torch.compile the mask's plan is one opaque op
(`ops.unpad.traceable_unpad_plan`) whose token count is a data-dependent size: no graph break; the op itself still
synchronises once (the token count), as eager does.

The one rule, eager and compiled alike: unpad when the plan packs sequences or when at least MIN_PADDING_FRACTION of
the B x L slots are padding; otherwise run the padded kernel, with no gather, and without a mask at all when nothing
is padded. A compiled forward without a plan cannot branch on the padding fraction (a data-dependent value in the
graph), so it counts as padded enough (unpadded path; identical values at every real position, zeros at padding
positions): the two modes then differ only for a batch with under MIN_PADDING_FRACTION padding, at its padding.
"""

from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPoolingAndCrossAttentions,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .. import ops
from ..ops.unpad import traceable_unpad_plan
from .forwards import MARK, PLAN_KEYWORD, _autocast_dtype

# Unpadding costs a gather of the embeddings' output and a scatter of the last layer's (and their backwards): about
# 8 * hidden bytes per real token per forward + backward. It saves every layer's work on each padding slot: for
# ELECTRA-base about 3 * (24 * hidden^2 + 4 * L * hidden) FLOPs per layer, 12 layers, ~0.57 GFLOP per slot. On an
# H100 (3.35 TB/s, ~700 TFLOP/s reachable) that is ~2 ns of copying against ~0.8 us saved per padding slot: break-even
# below 0.5 % padding, ~1 % for the small generator (hidden 256). 1/64 leaves room for the two extra launches and
# the plan's index arithmetic on small batches. PROJECTED from a roofline, not measured.
MIN_PADDING_FRACTION = 1 / 64

_PACKED_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def check_unpad_plan(plan: object, batch: int, seqlen: int, device: torch.device) -> ops.UnpadPlan:
    """`plan` if it is an UnpadPlan of a (batch, seqlen) layout on `device`; TypeError/ValueError naming it if not.

    Only what the host knows is checked (types, shapes, devices): checking the values would synchronise."""
    if not isinstance(plan, ops.UnpadPlan):
        raise TypeError(f"unpad_plan must be an electra_triton.ops.UnpadPlan, got {type(plan).__name__}")
    if (plan.batch, plan.seqlen) != (batch, seqlen):
        raise ValueError(f"unpad_plan is for a ({plan.batch}, {plan.seqlen}) batch, but the input is ({batch}, "
                         f"{seqlen})")
    for name, tensor, dtype in (("indices", plan.indices, torch.int64), ("cu_seqlens", plan.cu_seqlens, torch.int32)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype:
            raise TypeError(f"unpad_plan.{name} must be a {dtype} tensor, got "
                            f"{tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(f"unpad_plan.{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"unpad_plan.{name} is on {tensor.device} but the input is on {device} (move the plan "
                             "with the batch: plan.to(device))")
    if plan.indices.shape[0] > batch * seqlen:
        raise ValueError(f"unpad_plan.indices has {plan.indices.shape[0]} tokens, more than the {batch} x {seqlen} "
                         "slots of the batch")
    if plan.cu_seqlens.shape[0] < 1:
        raise ValueError("unpad_plan.cu_seqlens must have at least one entry (0)")
    if isinstance(plan.max_seqlen, bool) or not isinstance(plan.max_seqlen, int) or plan.max_seqlen < 0:
        raise ValueError(f"unpad_plan.max_seqlen must be a non-negative int, got {plan.max_seqlen!r}")
    return plan


def runs_unpadded(plan: ops.UnpadPlan) -> bool:
    """The one rule: real tokens only when the plan packs sequences or pads at least MIN_PADDING_FRACTION.

    A token count that only the device knows (a compiled forward's plan from the mask) counts as padded enough."""
    slots = plan.batch * plan.seqlen
    return plan.packed or guard_or_true(slots - plan.total_tokens >= MIN_PADDING_FRACTION * slots)


def _every_slot_real(plan: ops.UnpadPlan) -> bool:
    """Whether the plan's token stream is the padded layout itself (False when only the device knows)."""
    return guard_or_false(plan.total_tokens == plan.batch * plan.seqlen)


def _plan_of(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, given: object, packed: dict[str, Any],
    batch: int, seqlen: int, device: torch.device,
) -> ops.UnpadPlan | None:
    """The plan of this forward (see the module docstring), or None: padded layout, nothing known about padding."""
    if given is not None:
        return check_unpad_plan(given, batch, seqlen, device)
    if packed.get("cu_seq_lens_q") is not None:
        if attention_mask is not None:
            raise ValueError("attention_mask: pass either an attention mask or packed-sequence boundaries "
                             "(cu_seq_lens_q), not both")
        cu_seqlens = packed["cu_seq_lens_q"]
        max_length = packed.get("max_length_q")
        return ops.UnpadPlan(torch.arange(batch * seqlen, device=device), cu_seqlens.to(torch.int32),
                             seqlen if max_length is None else int(max_length), batch, seqlen, packed=True)
    if attention_mask is None:
        if position_ids is None or batch != 1 or position_ids.shape != (batch, seqlen) or \
                torch.compiler.is_compiling():
            return None
        # Sequences restart at the row's smallest position id, as transformers' flash attention reads them: 0, or
        # padding_idx + 1 for RoBERTa (DataCollatorWithFlattening(position_ids_start=...)).
        return ops.unpad_plan(None, position_ids - position_ids.min(), max_seqlen=seqlen)
    if torch.compiler.is_compiling():  # the token count is then a data-dependent size (module docstring)
        return traceable_unpad_plan(attention_mask)
    return ops.unpad_plan(attention_mask, max_seqlen=seqlen)


def _key_mask(attention_mask: torch.Tensor | None, plan: ops.UnpadPlan | None) -> torch.Tensor | None:
    """(B, L) bool key-padding mask for the padded kernel; None when the plan says nothing is padded."""
    if attention_mask is None or (plan is not None and _every_slot_real(plan)):
        return None
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def _to_padded(tokens: torch.Tensor, plan: ops.UnpadPlan) -> torch.Tensor:
    if _every_slot_real(plan):  # the token stream is the padded layout itself
        return tokens.view(plan.batch, plan.seqlen, -1)
    # index_copy, not index_put: its backward is an index_select, which no tracer mistakes for a boolean mask read.
    padded = tokens.new_zeros(plan.batch * plan.seqlen, tokens.shape[-1]).index_copy(0, plan.indices, tokens)
    return padded.view(plan.batch, plan.seqlen, -1)


def encoder_forward(
    self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None, unpad_plan: ops.UnpadPlan | None = None,
    **kwargs: Unpack[TransformersKwargs],
) -> BaseModelOutputWithPastAndCrossAttentions | BaseModelOutputWithPoolingAndCrossAttentions | tuple:
    """ElectraModel / BertModel / RobertaModel.forward, unpadded once (module docstring). unpad_plan: where the
    real tokens are (`ops.unpad_plan`, built in the data loader), spares the forward's host synchronisation."""
    given_plan = unpad_plan
    packed = {name: kwargs.pop(name) for name in _PACKED_KEYWORDS if name in kwargs}
    mode = getattr(self, MARK)["encoder"]
    output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
    stock_only = any(kwargs.get(name) is not None for name in ("encoder_hidden_states", "past_key_values", "cache"))
    if mode == "transformers" or output_attentions or stock_only or (
            attention_mask is not None and attention_mask.dim() != 2):
        # transformers' own forward: a plan of padding only is what the mask says already; packed rows it cannot keep
        # apart.
        inputs = input_ids if input_ids is not None else inputs_embeds
        if packed or (given_plan is not None and check_unpad_plan(
                given_plan, inputs.shape[0], inputs.shape[1], inputs.device).packed):
            raise ValueError(f"{PLAN_KEYWORD} / cu_seq_lens_q of packed sequences need the fused attention "
                             "(patch(attention=True)), a 2-D attention_mask and output_attentions=False")
        return type(self).forward(self, input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    output_hidden_states = kwargs.pop("output_hidden_states", None)
    output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = kwargs.pop("return_dict", None)
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
    kwargs.pop("use_cache", None)

    embeddings = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds)
    if hasattr(self, "embeddings_project"):
        embeddings = self.embeddings_project(embeddings)
    dtype = _autocast_dtype(embeddings.device)
    if dtype is not None:
        embeddings = embeddings.to(dtype)  # the residual stream's one cast (module docstring)
    batch, seqlen, hidden_size = embeddings.shape

    plan = None
    if mode == "auto" or given_plan is not None or packed:  # "padded" needs no plan: it never unpads
        plan = _plan_of(attention_mask, position_ids, given_plan, packed, batch, seqlen, embeddings.device)
    if mode == "auto" and plan is not None and runs_unpadded(plan):
        if _every_slot_real(plan):
            hidden = embeddings.view(batch * seqlen, hidden_size)
        else:
            hidden = embeddings.view(batch * seqlen, hidden_size).index_select(0, plan.indices)
        layer_mask, restore = None, lambda tokens: _to_padded(tokens, plan)
    else:
        if plan is not None and plan.packed:
            raise ValueError(f"{PLAN_KEYWORD}: packed sequences need patch(attention=True), not 'padded'")
        layer_mask = _key_mask(attention_mask, plan)
        hidden, plan, restore = embeddings, None, lambda padded: padded

    all_hidden = [embeddings] if output_hidden_states else None
    for layer in self.encoder.layer:
        hidden = layer(hidden, layer_mask, **{PLAN_KEYWORD: plan}, **kwargs)
        if isinstance(hidden, tuple):  # releases whose layers return (hidden_states, ...)
            hidden = hidden[0]
        if all_hidden is not None:
            all_hidden.append(restore(hidden))
    sequence_output = all_hidden[-1] if all_hidden is not None else restore(hidden)
    hidden_states = tuple(all_hidden) if all_hidden is not None else None
    if hasattr(self, "pooler"):  # BertModel, RobertaModel
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output, pooler_output=pooled, hidden_states=hidden_states)
    else:
        output = BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=sequence_output,
                                                           hidden_states=hidden_states)
    return output if return_dict else output.to_tuple()
