"""attn_implementation="electra_triton" against transformers' eager attention on padded batches: ELECTRA, BERT and
RoBERTa built from tiny configs (never downloaded), set_attn_implementation and from_pretrained, padded and unpadded
routes, dropout taken from the module in training, fallbacks."""

import logging

import pytest
import torch
from conftest import DEVICE
from transformers import BertConfig, BertModel, ElectraConfig, ElectraModel, RobertaConfig, RobertaModel

from electra_triton.integration import attention_backend

SIZES = {"vocab_size": 99, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 96, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0}
MODELS = {
    "electra": (ElectraModel, lambda **kw: ElectraConfig(embedding_size=32, **{**SIZES, **kw})),
    "bert": (BertModel, lambda **kw: BertConfig(**{**SIZES, **kw})),
    "roberta": (RobertaModel, lambda **kw: RobertaConfig(**{**SIZES, **kw})),
}


def build(name, attn="eager", **config):
    model_class, make_config = MODELS[name]
    torch.manual_seed(0)
    return model_class(make_config(attn_implementation=attn, **config)).to(DEVICE).eval()


def batch(lengths, seqlen, left=False):
    ids = torch.randint(3, 99, (len(lengths), seqlen), device=DEVICE)
    mask = torch.tensor([[(seqlen - 1 - i if left else i) < n for i in range(seqlen)] for n in lengths], device=DEVICE)
    return ids, mask.long()


def hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def assert_real_tokens_close(ours, eager, mask):
    real = mask.bool()
    torch.testing.assert_close(ours[real], eager[real], rtol=1e-4, atol=1e-4)


@pytest.fixture
def calls(monkeypatch):
    """Records which op the backend ran and with which dropout."""
    seen = []
    for name in ("attention", "attention_varlen"):
        original = getattr(attention_backend, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            seen.append((_name, args[5] if _name == "attention_varlen" else args[4]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(attention_backend, name, spy)
    return seen


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lengths, left, route", [
    ([24, 20, 17], False, "attention"),  # little padding: the padded kernel with a key mask
    ([24, 6, 3], True, "attention_varlen"),  # mostly padding (left-padded): packed real tokens
])
def test_matches_eager_on_padded_batch(name, lengths, left, route, calls):
    ids, mask = batch(lengths, 24, left)
    eager = hidden(build(name), ids, mask)
    model = build(name)
    model.set_attn_implementation("electra_triton")
    assert model.config._attn_implementation == "electra_triton"
    assert_real_tokens_close(hidden(model, ids, mask), eager, mask)
    assert {op for op, _ in calls} == {route} and len(calls) == SIZES["num_hidden_layers"]


def test_no_padding_runs_without_mask(calls):
    ids, mask = batch([16, 16], 16)
    eager = hidden(build("electra"), ids, mask)
    torch.testing.assert_close(hidden(build("electra", "electra_triton"), ids, mask), eager, rtol=1e-4, atol=1e-4)
    assert calls == [("attention", 0.0)] * 2


@pytest.mark.parametrize("name", list(MODELS))
def test_from_pretrained(name, tmp_path):
    build(name).save_pretrained(tmp_path)
    model_class, _ = MODELS[name]
    model = model_class.from_pretrained(tmp_path, attn_implementation="electra_triton").to(DEVICE).eval()
    assert model.config._attn_implementation == "electra_triton"
    ids, mask = batch([20, 9], 20)
    assert_real_tokens_close(hidden(model, ids, mask), hidden(build(name), ids, mask), mask)


def test_mask_function_gives_key_padding_mask():
    ids, mask = batch([10, 4], 10)
    model = build("electra", "electra_triton")
    embeds = model.embeddings(input_ids=ids)
    from transformers.masking_utils import create_bidirectional_mask

    made = create_bidirectional_mask(config=model.config, inputs_embeds=embeds, attention_mask=mask)
    assert made.dtype == torch.bool and torch.equal(made, mask.bool())
    assert create_bidirectional_mask(config=model.config, inputs_embeds=embeds,
                                     attention_mask=torch.ones_like(mask)) is None


def test_dropout_from_module_in_training_only(calls):
    ids, mask = batch([12, 9], 12)
    model = build("electra", "electra_triton", attention_probs_dropout_prob=0.1)
    hidden(model, ids, mask)
    assert [p for _, p in calls] == [0.0, 0.0]
    model.train()
    torch.manual_seed(1)
    first = model(input_ids=ids, attention_mask=mask).last_hidden_state
    second = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(1)
    again = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert [p for _, p in calls[2:]] == [0.1] * 6
    assert torch.equal(first, again) and not torch.equal(first, second)
    first.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_falls_back_for_4d_masks_and_decoders(caplog, calls):
    ids, mask = batch([12, 7], 12)
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # a user-made 4D mask
    eager_model = build("bert")
    ours_model = build("bert", "electra_triton")
    with caplog.at_level(logging.WARNING, logger="electra_triton"):
        with torch.no_grad():
            eager = eager_model(input_ids=ids, attention_mask=bias).last_hidden_state
            ours = ours_model(input_ids=ids, attention_mask=bias).last_hidden_state
        assert_real_tokens_close(ours, eager, mask)
        decoder_eager = build("bert", is_decoder=True)
        decoder = build("bert", "electra_triton", is_decoder=True)
        assert_real_tokens_close(hidden(decoder, ids, mask), hidden(decoder_eager, ids, mask), mask)
    assert calls == []
    assert "not a key-padding mask" in caplog.text or "causal" in caplog.text


def test_registered_on_import():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert attention_backend.NAME in ALL_ATTENTION_FUNCTIONS
    assert ALL_MASK_ATTENTION_FUNCTIONS["electra_triton"] is attention_backend.electra_triton_mask
