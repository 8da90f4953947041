"""The ELECTRA recipe: masking statistics, Gumbel-max sampling, RTD labels, loss weighting, shared embeddings, AdamW
groups and the learning-rate schedule."""

import math

import torch
from test_pretrain_data import MICRO_GENERATOR, MICRO_MODEL
from transformers import ElectraConfig

from electra_triton.pretrain.model import (
    ElectraPretrainer,
    build_models,
    gumbel_sample,
    linear_schedule,
    mask_tokens,
    max_predictions,
    parameter_groups,
)

CLS, SEP, PAD, MASK, VOCAB = 2, 3, 0, 4, 1000


class _Tokenizer:  # what build_models reads from a tokenizer
    pad_token_id = PAD

    def __len__(self) -> int:
        return VOCAB


def _batch(B: int = 256, L: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (B, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def test_masking_statistics():
    ids, mask = _batch()
    specials = torch.tensor([PAD, CLS, SEP, MASK])
    out = mask_tokens(ids, mask, specials, MASK, VOCAB, 0.15, 0.8, 0.1, max_predictions(128, 0.15))
    positions, weights, targets, masked = out["positions"], out["weights"], out["targets"], out["masked_ids"]
    candidates = ((mask == 1) & ~torch.isin(ids, specials)).sum(1)
    expected = (candidates.float() * 0.15).round().clamp(1, positions.shape[1])
    assert weights.sum(1).equal(expected.long())  # 15% of the non-special tokens, per sequence
    chosen = positions[weights]
    rows = torch.arange(ids.shape[0])[:, None].expand_as(positions)[weights]
    assert not torch.isin(ids[rows, chosen], specials).any()  # never [CLS], [SEP], [PAD]
    assert targets.equal(ids.gather(1, positions))
    new = masked[rows, chosen]
    share_mask = (new == MASK).float().mean().item()
    share_kept = (new == ids[rows, chosen]).float().mean().item()
    assert abs(share_mask - 0.8) < 0.02 and abs(share_kept - 0.1) < 0.02  # the rest are random tokens (~0.1)
    untouched = torch.ones_like(ids, dtype=torch.bool)
    untouched[rows, chosen] = False
    assert masked[untouched].equal(ids[untouched])
    # The positions are uniform over the candidates: the position histogram is flat over the first 64 columns.
    counts = torch.bincount(chosen, minlength=128)[1:60].float()
    assert counts.std() / counts.mean() < 0.2


def test_default_recipe_is_85_mask_15_unchanged():
    ids, mask = _batch(seed=1)
    out = mask_tokens(ids, mask, torch.tensor([PAD, CLS, SEP]), MASK, VOCAB, 0.15, 0.85, 0.0, 19)
    rows = torch.arange(ids.shape[0])[:, None].expand_as(out["positions"])[out["weights"]]
    new = out["masked_ids"][rows, out["positions"][out["weights"]]]
    share_mask = (new == MASK).float().mean().item()
    assert abs(share_mask - 0.85) < 0.02
    assert ((new == MASK) | (new == out["targets"][out["weights"]])).all()


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5], requires_grad=True).expand(40_000, 5)
    torch.manual_seed(0)
    samples = gumbel_sample(logits.to(torch.bfloat16))
    assert samples.dtype == torch.int64 and not samples.requires_grad
    frequencies = torch.bincount(samples, minlength=5).float() / samples.numel()
    expected = torch.softmax(logits[0].detach(), -1)
    assert torch.allclose(frequencies, expected, atol=0.01)
    hot = gumbel_sample(logits.detach()[:100], temperature=1e-3)
    assert (hot == 0).all()  # temperature -> 0 is the argmax


def _pretrainer(rtd_weight: float = 50.0) -> ElectraPretrainer:
    torch.manual_seed(0)
    generator, discriminator = build_models(MICRO_MODEL, MICRO_GENERATOR, _Tokenizer())
    return ElectraPretrainer(generator, discriminator, [PAD, CLS, SEP, MASK], MASK, rtd_weight=rtd_weight,
                             max_seq_len=32)


def test_rtd_labels_and_loss_weighting():
    model = _pretrainer()
    seen = {}
    forward = model.discriminator.forward

    def spy(input_ids, **kwargs):
        seen.update(kwargs, input_ids=input_ids)
        return forward(input_ids, **kwargs)

    model.discriminator.forward = spy
    ids, mask = _batch(8, 32)
    torch.manual_seed(1)
    out = model(ids, mask, torch.zeros_like(ids))
    replaced = (seen["input_ids"] != ids) & (mask == 1)
    assert seen["labels"].equal(replaced.long())  # 1 exactly where the sample differs from the original
    assert 0 < replaced.sum() <= 8 * max_predictions(32, 0.15)
    assert torch.allclose(out["loss"], out["mlm_loss"] + 50 * out["rtd_loss"])
    # The generator is untrained: nearly every sample differs, but a sampled original token is labelled 0.
    assert out["replaced"] == replaced.sum()
    torch.manual_seed(1)
    model.rtd_weight = 1.0
    again = model(ids, mask, torch.zeros_like(ids))
    assert torch.allclose(again["loss"], again["mlm_loss"] + again["rtd_loss"])
    assert torch.equal(again["mlm_loss"], out["mlm_loss"])
    # Gradients: the discriminator only through rtd, the shared embeddings through both.
    again["loss"].backward()
    embeddings = model.discriminator.electra.embeddings.word_embeddings.weight
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert model.generator.electra.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0


def test_embeddings_are_shared_and_tied():
    model = _pretrainer()
    gen, disc = model.generator, model.discriminator
    assert gen.electra.embeddings is disc.electra.embeddings
    assert gen.generator_lm_head.weight is disc.electra.embeddings.word_embeddings.weight
    assert hasattr(disc.electra, "embeddings_project") and not hasattr(gen.electra, "embeddings_project")
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(set(map(id, model.parameters())))  # each shared parameter once for the optimizer


def test_weight_decay_groups():
    model = _pretrainer()
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_linear_warmup_then_linear_decay():
    factor = linear_schedule(10, 110)
    values = [factor(step) for step in range(111)]
    assert math.isclose(values[9], 1.0) and values[0] == 0.1
    assert all(a < b for a, b in zip(values[:10], values[1:10], strict=False))
    assert math.isclose(values[60], 0.5) and values[110] == 0.0


def test_flops_per_token_counts_both_models():
    from electra_triton.pretrain.model import flops_per_token

    disc = ElectraConfig(**MICRO_MODEL, vocab_size=VOCAB)
    gen = ElectraConfig(**MICRO_GENERATOR, vocab_size=VOCAB)
    assert flops_per_token(disc, gen, 32, 0.15) > flops_per_token(disc, disc, 32, 0.15) * 0.5 > 0
