"""A patched model behaves like transformers' own (issue 15): what transformers documents and its own model tests rely
on, for every ELECTRA, BERT and RoBERTa head class. The stock model runs eager attention, so that its attention
probabilities exist to compare with."""

import copy
import inspect
import logging

import pytest
import torch
from conftest import DEVICE
from transformers import BertConfig, ElectraConfig, PreTrainedModel, RobertaConfig
from transformers.models.bert import modeling_bert as bert
from transformers.models.electra import modeling_electra as electra
from transformers.models.roberta import modeling_roberta as roberta

import electra_triton
from electra_triton import fused_modules, ops

VOCAB, BATCH, SEQLEN, LAYERS, HEADS = 64, 2, 8, 2, 2
SIZES = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
         "intermediate_size": 96, "max_position_embeddings": 40, "num_labels": 2, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0}
CONFIGS = {electra: lambda **kw: ElectraConfig(embedding_size=32, **{**SIZES, **kw}),
           bert: lambda **kw: BertConfig(**{**SIZES, **kw}),
           roberta: lambda **kw: RobertaConfig(pad_token_id=1, **{**SIZES, **kw})}
MODEL_CLASSES = [cls for module in CONFIGS for name in module.__all__ if isinstance(cls := getattr(module, name), type)
                 and issubclass(cls, PreTrainedModel) and not name.endswith("PreTrainedModel")]
# What a patched forward may take beyond transformers' own (keyword-only; documented in patch.py and encoder.py).
PROJECT_KEYWORDS = {"skip_logits", "unpad_plan"}


def _pair(model_cls, attn="eager", flags=None, **config):
    torch.manual_seed(0)
    stock = model_cls(CONFIGS[inspect.getmodule(model_cls)](attn_implementation=attn, **config)).to(DEVICE).eval()
    patched = electra_triton.patch(copy.deepcopy(stock), **(flags or {}))
    assert fused_modules(patched)
    return stock, patched


def _inputs(model_cls, lengths=(SEQLEN, 5)):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQLEN), device=DEVICE)
    mask = (torch.arange(SEQLEN, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]).long()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model_cls is electra.ElectraForPreTraining:
        inputs["labels"] = torch.randint(0, 2, (BATCH, SEQLEN), device=DEVICE)
    elif model_cls is electra.ElectraForMaskedLM:
        inputs["labels"] = torch.where(mask.bool() & (torch.rand(BATCH, SEQLEN, device=DEVICE) < 0.5), ids, -100)
    if "MultipleChoice" in model_cls.__name__:
        inputs = {k: torch.stack([v, v.roll(1, dims=-1)], dim=1) for k, v in inputs.items()}
    return inputs


def _assert_same_structure_and_close(ours, theirs, where="output"):
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.shape == theirs.shape, where
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=where)
        return
    assert type(ours) is type(theirs) and len(ours) == len(theirs), f"{where}: {type(ours)} of {len(ours)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        _assert_same_structure_and_close(a, b, f"{where}[{i}]")


@pytest.mark.parametrize("model_cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_forward_signature_and_annotations_are_transformers(model_cls):
    # transformers' tests read `**kwargs: Unpack[TransformersKwargs]` to learn that a model returns attentions.
    stock, patched = _pair(model_cls)
    theirs, ours = inspect.signature(stock.forward), inspect.signature(patched.forward)
    assert ours.return_annotation == theirs.return_annotation
    extra = [p for name, p in ours.parameters.items() if name not in theirs.parameters]
    assert all(p.name in PROJECT_KEYWORDS and p.kind is p.KEYWORD_ONLY for p in extra), extra
    same = [p for p in ours.parameters.values() if p not in extra]
    assert same == list(theirs.parameters.values())


@pytest.mark.parametrize("model_cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_tuple_with_attentions_and_hidden_states(model_cls):
    """return_dict=False with output_attentions and output_hidden_states: transformers' tuple, element by element.

    While attention maps are returned every layer runs eager attention, so padding positions match too."""
    stock, patched = _pair(model_cls)
    inputs = _inputs(model_cls)
    with torch.no_grad():
        theirs = stock(**inputs, output_attentions=True, output_hidden_states=True, return_dict=False)
        ours = patched(**inputs, output_attentions=True, output_hidden_states=True, return_dict=False)
    assert isinstance(ours, tuple)
    _assert_same_structure_and_close(ours, theirs)
    maps = [x for x in ours if isinstance(x, tuple) and len(x) == LAYERS]  # decoders' cross-attentions are ()
    assert len(maps) == 1 and maps[0][0].shape[-3:] == (HEADS, SEQLEN, SEQLEN)


@pytest.mark.parametrize("attn", ["sdpa", "electra_triton"])
def test_output_attentions_is_eager_for_that_call_only(attn, monkeypatch, caplog):
    # The patched attention serves any attn_implementation; each hands attention another kind of mask.
    calls = []
    original = ops.attention_qkvpacked
    monkeypatch.setattr(ops, "attention_qkvpacked", lambda *a, **k: calls.append(1) or original(*a, **k))
    stock, _ = _pair(electra.ElectraForPreTraining)
    _, patched = _pair(electra.ElectraForPreTraining, attn=attn, flags={"attention": "padded"})
    inputs = _inputs(electra.ElectraForPreTraining)
    electra_triton.integration.attention_backend._warned.clear()
    with caplog.at_level(logging.WARNING, logger="electra_triton"), torch.no_grad():
        ours = patched(**inputs, output_attentions=True)
        again = patched(**inputs, output_attentions=True)
        assert calls == []
        fused = patched(**inputs)
    assert len(calls) == LAYERS and fused.attentions is None
    assert caplog.text.count("fused attention is off while attention maps are returned") == 1
    with torch.no_grad():
        theirs = stock(**inputs, output_attentions=True)
    for a, b, c in zip(ours.attentions, again.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    torch.testing.assert_close(ours.logits, fused.logits, rtol=1e-4, atol=1e-5)


def test_output_attentions_from_config_and_gradients():
    stock, patched = _pair(electra.ElectraForMaskedLM, output_attentions=True)
    inputs = _inputs(electra.ElectraForMaskedLM)
    ours, theirs = patched(**inputs), stock(**inputs)
    assert len(ours.attentions) == LAYERS
    ours.attentions[-1].retain_grad()  # as transformers' test_retain_grad_hidden_states_attentions does
    (ours.loss + ours.attentions[-1].square().sum()).backward()
    (theirs.loss + theirs.attentions[-1].square().sum()).backward()
    assert ours.attentions[-1].grad is not None
    for (name, p), q in zip(patched.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert patched(**inputs, output_attentions=False).attentions is None


@pytest.mark.parametrize("boolean", [True, False], ids=["bool", "additive"])
def test_a_4d_attention_mask_is_applied_as_given(boolean):
    """A user-built (B, 1, L, L) mask (here: two blocks that must not see each other) is not a key-padding mask: the
    call runs eager attention with it. Stock sdpa is the reference for boolean masks (stock eager adds them)."""
    stock, patched = _pair(electra.ElectraForTokenClassification, attn="sdpa" if boolean else "eager")
    allowed = torch.zeros(BATCH, 1, SEQLEN, SEQLEN, dtype=torch.bool, device=DEVICE)
    allowed[..., :3, :3] = allowed[..., 3:, 3:] = True
    mask = allowed if boolean else torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, -1e9)
    ids = _inputs(electra.ElectraForTokenClassification)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(patched(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", [True, "padded"])
def test_hidden_states_keep_the_padded_layout(attention):
    # Mostly padding: the patched attention takes the unpadded (varlen) route when it may.
    stock, patched = _pair(electra.ElectraModel, flags={"attention": attention})
    inputs = _inputs(electra.ElectraModel, lengths=(3, 2))
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = patched(**inputs, output_hidden_states=True), stock(**inputs, output_hidden_states=True)
    assert len(ours.hidden_states) == LAYERS + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert a.shape == b.shape == (BATCH, SEQLEN, 64)
        torch.testing.assert_close(a[real], b[real], rtol=1e-4, atol=1e-5)
    assert ours.hidden_states[-1] is ours.last_hidden_state


def test_return_dict_false_from_config():
    stock, patched = _pair(electra.ElectraForPreTraining, return_dict=False)
    inputs = _inputs(electra.ElectraForPreTraining, lengths=(SEQLEN, SEQLEN))  # no padding: every logit compares
    with torch.no_grad():
        ours, theirs = patched(**inputs), stock(**inputs)
    assert isinstance(ours, tuple) and len(ours) == len(theirs) == 2  # (loss, logits)
    _assert_same_structure_and_close(ours, theirs)


@pytest.mark.parametrize("model_cls", [electra.ElectraForPreTraining, electra.ElectraForMaskedLM, bert.BertModel,
                                       roberta.RobertaForSequenceClassification], ids=lambda c: c.__name__)
def test_inputs_embeds(model_cls):
    stock, patched = _pair(model_cls)
    inputs = _inputs(model_cls)
    embeds = stock.get_input_embeddings()(inputs.pop("input_ids")).detach()
    real = inputs["attention_mask"].bool()
    results = []
    for model in (stock, patched):
        leaf = embeds.clone().requires_grad_()
        out = model(inputs_embeds=leaf, **inputs)
        result = out.logits if out.get("logits") is not None else out.last_hidden_state
        if result.shape[:2] == real.shape:  # per token: padding positions are not compared
            result = result[real]
        (out.loss if out.get("loss") is not None else result.sum()).backward()
        results.append((result, leaf.grad))
    (ours, ours_grad), (theirs, theirs_grad) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_grad[real], theirs_grad[real], rtol=1e-3, atol=1e-5)


def test_token_type_ids_missing_or_given():
    stock, patched = _pair(electra.ElectraForSequenceClassification, type_vocab_size=2)
    inputs = _inputs(electra.ElectraForSequenceClassification)
    segments = (torch.arange(SEQLEN, device=DEVICE) >= SEQLEN // 2).long().expand(BATCH, SEQLEN)
    with torch.no_grad():
        missing = patched(**inputs).logits
        zeros = patched(**inputs, token_type_ids=torch.zeros_like(segments)).logits
        given = patched(**inputs, token_type_ids=segments).logits
        torch.testing.assert_close(missing, stock(**inputs).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(given, stock(**inputs, token_type_ids=segments).logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(missing, zeros, rtol=0, atol=0)
    assert not torch.allclose(missing, given)


@pytest.mark.parametrize("model_cls", [electra.ElectraModel, electra.ElectraForPreTraining], ids=lambda c: c.__name__)
def test_head_mask_as_the_installed_release(model_cls):
    """The installed transformers decides what head_mask does (5.x forwards no longer take it; extra kwargs are
    passed down and ignored): the patched model must do the same, neither fail nor compute something else."""
    stock, patched = _pair(model_cls)
    inputs = _inputs(model_cls)
    inputs.pop("labels", None)  # output [0]: per-token logits / hidden states
    head_mask = torch.ones(LAYERS, HEADS, device=DEVICE)
    head_mask[0, 0] = 0

    def run(model):
        try:
            with torch.no_grad():
                return model(**inputs, head_mask=head_mask)[0][inputs["attention_mask"].bool()]
        except (TypeError, ValueError) as error:
            return type(error)

    theirs, ours = run(stock), run(patched)
    if isinstance(theirs, type):
        assert ours is theirs
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Packed sequences through a patched model: transformers' DataCollatorWithFlattening conventions.


def _collated(model, sequences, flash_kwargs):
    from transformers import DataCollatorWithFlattening

    # RoBERTa's positions start after its padding index, so its packed position ids must too.
    start = model.config.pad_token_id + 1 if isinstance(model, roberta.RobertaPreTrainedModel) else 0
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, position_ids_start=start)
    collated = collate([{"input_ids": s.tolist()} for s in sequences])
    collated.pop("labels")
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}


def _projection_grads(model, tokens):
    model.zero_grad()
    (tokens * torch.linspace(-1, 1, tokens.numel(), device=DEVICE).view(tokens.shape)).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_cls", [electra.ElectraModel, bert.BertModel, roberta.RobertaModel],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_sequences_through_a_patched_model(model_cls, flash_kwargs):
    stock, patched = _pair(model_cls)
    torch.manual_seed(3)
    sequences = [torch.randint(3, VOCAB, (n,)) for n in (5, 8, 3)]
    ids = torch.stack([torch.cat([s, s.new_full((8 - len(s),), 1)]) for s in sequences]).to(DEVICE)
    mask = (torch.arange(8) < torch.tensor([5, 8, 3])[:, None]).long().to(DEVICE)
    expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]  # (16, hidden)
    expected_grads = _projection_grads(stock, expected)
    packed = patched(**_collated(patched, sequences, flash_kwargs)).last_hidden_state[0]
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=1e-4)
    grads = _projection_grads(patched, packed)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_packed_sequences_pretraining_loss():
    stock, patched = _pair(electra.ElectraForPreTraining)
    torch.manual_seed(4)
    sequences = [torch.randint(3, VOCAB, (n,)) for n in (6, 4)]
    ids = torch.stack([sequences[0], torch.cat([sequences[1], sequences[1].new_full((2,), 1)])]).to(DEVICE)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], device=DEVICE)
    labels = torch.randint(0, 2, (2, 6), device=DEVICE)
    expected = stock(input_ids=ids, attention_mask=mask, labels=labels)
    inputs = _collated(patched, sequences, flash_kwargs=False)
    ours = patched(**inputs, labels=labels[mask.bool()][None])
    torch.testing.assert_close(ours.loss, expected.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.logits[0], expected.logits[mask.bool()], rtol=1e-4, atol=1e-4)
