"""The patched encoder's structure, counted on CPU with OpTrace: host syncs per forward, device ops per layer against
stock transformers (sdpa), the padded / unpadded rule, and the unpad plan's edge cases and argument checks."""

import copy

import pytest
import torch
from conftest import DEVICE
from transformers import (
    BertConfig,
    BertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraForTokenClassification,
    ElectraModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import electra_triton
from electra_triton import ops
from electra_triton.integration.encoder import MIN_PADDING_FRACTION, runs_unpadded
from electra_triton.integration.patch import fused_modules
from electra_triton.tracing import OpTrace

VOCAB = 64


def _config(layers=1, hidden=64, heads=2, **overrides):
    return ElectraConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=80,
                         **overrides)


def _padded_batch(batch=2, seqlen=8):
    ids = torch.randint(3, VOCAB, (batch, seqlen), device=DEVICE)
    mask = torch.ones(batch, seqlen, dtype=torch.long, device=DEVICE)
    mask[1, 5:] = 0
    return ids, mask


def _pretraining_step(layers: int, patched: bool, with_plan: bool = False, autocast: bool = False) -> OpTrace:
    """One ELECTRA step, traced: generator (MLM) and discriminator (RTD), forward and backward, padded batch,
    training mode (dropout on), optionally under 16-bit autocast as in production."""
    torch.manual_seed(0)
    stock = {} if patched else {"attn_implementation": "sdpa"}
    generator = ElectraForMaskedLM(_config(layers, hidden=32, heads=1, **stock)).to(DEVICE).train()
    discriminator = ElectraForPreTraining(_config(layers, **stock)).to(DEVICE).train()
    if patched:
        electra_triton.patch(generator)
        electra_triton.patch(discriminator)
    ids, mask = _padded_batch()
    labels = torch.where(torch.rand(ids.shape, device=DEVICE) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    labels[0, 0] = ids[0, 0]
    replaced = (torch.rand(ids.shape, device=DEVICE) < 0.2).long()
    # The data loader builds the plan on the CPU and moves it with the batch: no synchronisation in the step.
    plan = {"unpad_plan": ops.unpad_plan(mask.cpu()).to(DEVICE)} if with_plan else {}
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    with OpTrace() as trace, torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
        generator_loss = generator(ids, attention_mask=mask, labels=labels, **plan).loss
        discriminator_loss = discriminator(ids, attention_mask=mask, labels=replaced, **plan).loss
        (generator_loss + discriminator_loss).backward()
    return trace


@pytest.mark.slow  # four traced steps in the interpreter: ~10-20 s on 2 cores
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_pretraining_step_syncs_and_ops_per_layer_against_stock(autocast):
    # Per layer = the difference between models of 2 and 1 layers (generator + discriminator layer, fwd + bwd).
    stock = [_pretraining_step(layers, patched=False, autocast=autocast) for layers in (1, 2)]
    ours = [_pretraining_step(layers, patched=True, autocast=autocast) for layers in (1, 2)]
    stock_per_layer = stock[1].device_ops - stock[0].device_ops
    ours_per_layer = ours[1].device_ops - ours[0].device_ops
    print(f"device ops per generator + discriminator layer: patched {ours_per_layer}, stock sdpa {stock_per_layer}; "
          f"host syncs per step: patched {ours[1].host_syncs}, stock {stock[1].host_syncs}")
    assert ours_per_layer <= 0.5 * stock_per_layer, (ours[1].counts() - ours[0].counts())
    # Two forwards per step: at most one synchronisation each (the real-token count), none of them per layer.
    assert ours[1].host_syncs <= 2 and ours[1].host_syncs == ours[0].host_syncs, ours[1].sync_ops()
    per_layer = ours[1].counts() - ours[0].counts()
    assert not [name for name in per_layer if "index" in name or "nonzero" in name], per_layer  # unpadded once
    assert per_layer["electra_triton::attention_qkvpacked_forward"] == 2
    # Per model: 3 GEMMs forward (one for q, k and v), 6 backward (the gelu_linear op runs its own two).
    assert per_layer["aten::addmm"] + per_layer["aten::mm"] == 18, per_layer
    # The residual stream's gradients enter the dX GEMMs (ops.linear / gelu_linear return_residual): no add.
    assert per_layer["aten::add"] == 0, per_layer
    # Every weight and bias of a layer cast (and q/k/v packed) in one launch forward and one backward, per model.
    assert per_layer["aten::_foreach_copy_"] == 4 and per_layer["aten::_to_copy"] == 0, per_layer


def test_pretraining_step_with_a_supplied_plan_never_syncs():
    trace = _pretraining_step(2, patched=True, with_plan=True)
    assert trace.host_syncs == 0, trace.sync_ops()


def _model_pair(**config):
    torch.manual_seed(0)
    reference = ElectraModel(_config(**config)).to(DEVICE).eval()
    return reference, electra_triton.patch(copy.deepcopy(reference))


def _traced(model, *args, **kwargs):
    with OpTrace() as trace:
        out = model(*args, **kwargs)
    return out, trace


def test_unpadded_batch_runs_padded_kernel_without_gather_or_mask():
    reference, patched = _model_pair()
    ids, _ = _padded_batch()
    mask = torch.ones_like(ids)
    out, trace = _traced(patched, ids, attention_mask=mask)
    counts = trace.counts()
    assert counts["aten::index_select"] == 0 and counts["aten::index_copy"] == 0
    attention = [r for r in trace.records if r.name == "electra_triton::attention_qkvpacked_forward"]
    assert len(attention) == 1 and all(meta.shape != (2, 8) for meta in attention[0].inputs)  # no key mask read
    torch.testing.assert_close(out.last_hidden_state, reference(ids, attention_mask=mask).last_hidden_state,
                               rtol=1e-4, atol=1e-5)


def test_rule_follows_padding_fraction():
    # 2 x 40 slots: one padding slot is 1.25 % (< 1/64, padded kernel), eight are 10 % (unpadded).
    reference, patched = _model_pair()
    ids = torch.randint(3, VOCAB, (2, 40), device=DEVICE)
    for padding, gathers in ((1, 0), (8, 1)):
        mask = torch.ones_like(ids)
        mask[1, 40 - padding:] = 0
        plan = ops.unpad_plan(mask)
        assert runs_unpadded(plan) == bool(gathers)
        assert (padding / 80 >= MIN_PADDING_FRACTION) == bool(gathers)
        out, trace = _traced(patched, ids, attention_mask=mask)
        assert trace.counts()["aten::index_select"] == gathers
        real = mask.bool()
        torch.testing.assert_close(out.last_hidden_state[real],
                                   reference(ids, attention_mask=mask).last_hidden_state[real], rtol=1e-4, atol=1e-5)
    assert runs_unpadded(ops.unpad_plan(torch.ones(2, 40), torch.zeros(2, 40, dtype=torch.long)))  # packed


@pytest.mark.parametrize("pattern", ["left", "holes"])
def test_left_padding_and_holes_match_transformers(pattern):
    reference, patched = _model_pair()
    ids, mask = _padded_batch()
    mask = torch.ones_like(mask)
    if pattern == "left":
        mask[1, :3] = 0
    else:
        mask[0, 2] = mask[1, 4:6] = 0
    real = mask.bool()
    out = patched(ids, attention_mask=mask, output_hidden_states=True)
    expected = reference(ids, attention_mask=mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == expected.last_hidden_state.shape
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-5)
    as_tuple = patched(ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)


@pytest.mark.parametrize("case", ["fused", "chunked-feed-forward", "attention-maps"])
def test_fused_layer_and_its_fallback_match_transformers_with_gradients(case):
    # The fused layer serves a plain self-attention layer; transformers' layer forward (over the fused modules)
    # serves attention maps; a chunked feed-forward runs in one piece. Values and every gradient agree with stock.
    reference, patched = _model_pair(layers=2, **({"chunk_size_feed_forward": 4} if case == "chunked-feed-forward"
                                                  else {}))
    assert fused_modules(patched)["encoder.layer.0"] == {"layer": True}
    ids, mask = _padded_batch()
    real = mask.bool()
    kwargs = {"output_attentions": True} if case == "attention-maps" else {}
    outputs = [model(ids, attention_mask=mask, **kwargs) for model in (patched, reference)]
    probe = torch.randn_like(outputs[1].last_hidden_state[real])  # (a LayerNorm output's square sum is constant)
    for out in outputs:
        (out.last_hidden_state[real] * probe).sum().backward()
    torch.testing.assert_close(outputs[0].last_hidden_state[real], outputs[1].last_hidden_state[real], rtol=1e-4,
                               atol=1e-5)
    if case == "attention-maps":  # (stock sdpa returns none to compare with: the attention backend's tests do)
        assert [tuple(a.shape) for a in outputs[0].attentions] == [(2, 2, 8, 8)] * 2
    theirs = dict(reference.named_parameters())
    for name, param in patched.named_parameters():
        if "pooler" not in name:
            torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_sequence_without_real_tokens_gives_zeros_and_finite_gradients():
    _, patched = _model_pair()
    ids, mask = _padded_batch()
    mask[0] = 0
    out = patched(ids, attention_mask=mask).last_hidden_state
    assert torch.count_nonzero(out[0]) == 0 and torch.isfinite(out).all()
    out[1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)


def test_supplied_and_packed_plans():
    reference, patched = _model_pair()
    ids, mask = _padded_batch()
    # A plan built on the CPU gives what the mask gives.
    torch.testing.assert_close(patched(ids, attention_mask=mask, unpad_plan=ops.unpad_plan(mask.cpu())).
                               last_hidden_state, patched(ids, attention_mask=mask).last_hidden_state)
    # Two sequences packed into one row (position_ids restart at 0) match the two run separately.
    first, second = ids[0, :5], ids[1, :3]
    packed_ids = torch.cat([first, second])[None]
    position_ids = torch.cat([torch.arange(5), torch.arange(3)])[None].to(DEVICE)
    separate = [reference(row[None]).last_hidden_state[0] for row in (first, second)]
    expected = torch.cat(separate)
    by_plan = patched(packed_ids, position_ids=position_ids,
                      unpad_plan=ops.unpad_plan(None, position_ids)).last_hidden_state[0]
    cu_seqlens = torch.tensor([0, 5, 8], dtype=torch.int32, device=DEVICE)
    by_kwargs = patched(packed_ids, position_ids=position_ids, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                        max_length_q=5, max_length_k=5).last_hidden_state[0]
    by_position_ids = patched(packed_ids, position_ids=position_ids).last_hidden_state[0]
    for ours in (by_plan, by_kwargs, by_position_ids):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_cls", [
    ElectraForPreTraining, ElectraForMaskedLM, ElectraForSequenceClassification, ElectraForTokenClassification,
    ElectraForQuestionAnswering, BertForMaskedLM, RobertaForSequenceClassification,
], ids=lambda cls: cls.__name__)
def test_unpad_plan_is_a_forward_keyword_of_every_head(model_cls):
    torch.manual_seed(0)
    sizes = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 128, "max_position_embeddings": 40, "pad_token_id": 1}
    config = _config(layers=1) if model_cls.__name__.startswith("Electra") else (
        BertConfig(**sizes) if model_cls is BertForMaskedLM else RobertaConfig(**sizes))
    model = electra_triton.patch(model_cls(config).to(DEVICE).eval())
    ids, mask = _padded_batch()
    plan = ops.unpad_plan(mask.cpu()).to(DEVICE)
    with OpTrace() as trace:
        out = model(ids, attention_mask=mask, unpad_plan=plan)
    assert trace.host_syncs == 0, trace.sync_ops()
    expected = model(ids, attention_mask=mask)
    for key in ("logits", "start_logits"):
        if key in out:
            torch.testing.assert_close(out[key], expected[key])


def test_bad_unpad_plan_names_the_argument():
    _, patched = _model_pair()
    ids, mask = _padded_batch()
    plan = ops.unpad_plan(mask)
    with pytest.raises(TypeError, match="unpad_plan must be"):
        patched(ids, attention_mask=mask, unpad_plan=(plan.indices, plan.cu_seqlens))
    with pytest.raises(ValueError, match="unpad_plan is for a"):
        patched(ids[:1], attention_mask=mask[:1], unpad_plan=plan)
    with pytest.raises(TypeError, match="unpad_plan.cu_seqlens"):
        patched(ids, attention_mask=mask, unpad_plan=plan._replace(cu_seqlens=plan.cu_seqlens.long()))
    with pytest.raises(ValueError, match="unpad_plan.indices is on meta"):
        patched(ids, attention_mask=mask, unpad_plan=plan._replace(indices=plan.indices.to("meta")))
    with pytest.raises(ValueError, match="unpad_plan.max_seqlen"):
        patched(ids, attention_mask=mask, unpad_plan=plan._replace(max_seqlen=-1))
    with pytest.raises(ValueError, match="attention_mask"):
        patched(ids, attention_mask=mask, cu_seq_lens_q=plan.cu_seqlens, max_length_q=5)
    # Without fused attention a plan of padding only says what the mask says; packed rows cannot be kept apart.
    unfused = electra_triton.patch(ElectraModel(_config()).to(DEVICE).eval(), attention=False)
    torch.testing.assert_close(unfused(ids, attention_mask=mask, unpad_plan=plan).last_hidden_state,
                               unfused(ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(ValueError, match="unpad_plan"):
        unfused(ids, attention_mask=mask, unpad_plan=ops.unpad_plan(mask, torch.zeros_like(mask)))
    with pytest.raises(TypeError, match="unpad_plan must be"):
        unfused(ids, attention_mask=mask, unpad_plan=(plan.indices, plan.cu_seqlens))


@pytest.mark.parametrize("plan_from", ["caller", "mask"])
def test_compiled_forward_takes_the_unpadded_path_without_graph_breaks(plan_from):
    # Dynamo's capture (eager backend) of the unpad-once path: a supplied plan's sizes are input shapes; a plan from
    # the mask is one opaque op whose token count is a data-dependent size. Same values as eager, zeros at padding.
    _, patched = _model_pair()
    ids, mask = _padded_batch()
    plan = {"unpad_plan": ops.unpad_plan(mask.cpu()).to(DEVICE)} if plan_from == "caller" else {}
    expected = patched(ids, attention_mask=mask).last_hidden_state
    compiled = torch.compile(patched, fullgraph=True, backend="eager")
    out = compiled(ids, attention_mask=mask, **plan).last_hidden_state
    torch.testing.assert_close(out, expected)
    assert torch.count_nonzero(out[1, 5:]) == 0
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)
