"""Packing: several ELECTRA examples per row, each with its own [CLS] ... [SEP], token types, positions from 0, masking
per example, and the exactness of the whole thing (a packed row computes what the same examples do one per row)."""

import random

import pytest
import torch
from test_pretrain_data import MICRO_GENERATOR, MICRO_MODEL, corpus_and_tokenizer  # noqa: F401 (fixture)

import electra_triton
from electra_triton.ops import _dispatch
from electra_triton.pretrain.data import ExampleStream
from electra_triton.pretrain.model import (
    accepts_unpad_plan,
    block_diagonal_mask,
    build_models,
    encoder_inputs,
    mask_tokens,
    prediction_slots,
    predictions_bound,
)
from electra_triton.pretrain.packing import Batcher

CLS, SEP, PAD, MASK, VOCAB = 2, 3, 0, 4, 300
SPECIALS = torch.tensor([PAD, 1, CLS, SEP, MASK])


class ListStream:
    """An example stream over a fixed list of (A ids, B ids) examples, as ExampleStream represents them."""

    example_length = staticmethod(ExampleStream.example_length)
    materialize = staticmethod(ExampleStream.materialize)
    restore_example = staticmethod(ExampleStream.restore_example)

    def __init__(self, examples):
        self.examples = examples
        self.index = 0

    def next_example(self):
        example = self.examples[self.index % len(self.examples)]
        self.index += 1
        return example

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def random_examples(count: int, max_seq_len: int, seed: int = 0):
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.choice([rng.randint(1, 6), rng.randint(1, max_seq_len - 3)])
        cut = rng.randint(1, length) if length > 1 and rng.random() < 0.8 else length
        ids = [rng.randrange(10, VOCAB) for _ in range(length)]
        examples.append((ids[:cut], ids[cut:]))
    return examples


def _batcher(examples, max_seq_len, packing, **kwargs):
    return Batcher(ListStream(examples), max_seq_len, CLS, SEP, PAD, packing=packing, **kwargs)


def test_packed_rows_keep_each_example_whole():
    L = 48
    examples = random_examples(200, L)
    batcher = _batcher(examples, L, packing=True, pool_size=32, plan=True)
    batch = batcher.next_batch(16)
    ids, types, positions, mask = (batch[k] for k in ("input_ids", "token_type_ids", "position_ids", "attention_mask"))
    plan = batch["unpad_plan"]
    seen = []
    for row in range(ids.shape[0]):
        real = int(mask[row].sum())
        assert mask[row, :real].all() and not mask[row, real:].any() and (ids[row, real:] == PAD).all()
        starts = (positions[row, :real] == 0).nonzero().flatten().tolist() + [real]
        for start, end in zip(starts, starts[1:], strict=False):
            example = ids[row, start:end].tolist()
            assert positions[row, start:end].tolist() == list(range(end - start))
            assert example[0] == CLS and example[-1] == SEP
            seps = [i for i, token in enumerate(example) if token == SEP]
            first = example[1:seps[0]]
            second = example[seps[0] + 1:-1] if len(seps) == 2 else []
            assert types[row, start:end].tolist() == [0] * (seps[0] + 1) + [1] * (end - start - seps[0] - 1)
            seen.append((first, second))
        # Masking room: the row's examples can never ask for more positions than the row has slots.
        lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert sum(predictions_bound(n, 0.15) for n in lengths) <= prediction_slots(L, 0.15, True)
    # Every example is one the stream produced, each taken once; the plan's sequences are the examples.
    produced = [tuple(map(tuple, e)) for e in examples[: batcher.stream.index]]
    packed = [tuple(map(tuple, e)) for e in seen]
    assert all(produced.count(e) >= packed.count(e) for e in packed)
    assert len(seen) == plan.cu_seqlens.numel() - 1
    assert plan.cu_seqlens.diff().tolist() == [len(a) + len(b) + (3 if b else 2) for a, b in seen]
    assert float(mask.float().mean()) > 0.9  # fill: the pool finds examples for the rows' ends


def test_unpacked_rows_are_one_example_each():
    examples = random_examples(20, 32)
    batch = _batcher(examples, 32, packing=False).next_batch(20)
    assert "position_ids" not in batch and "unpad_plan" not in batch
    for row, (first, second) in enumerate(examples):
        expected = [CLS, *first, SEP] + ([*second, SEP] if second else [])
        assert batch["input_ids"][row, : len(expected)].tolist() == expected
        assert batch["attention_mask"][row].sum() == len(expected)


def test_packing_pool_resumes_exactly():
    examples = random_examples(300, 40, seed=1)
    batcher = _batcher(examples, 40, packing=True, pool_size=24)
    for _ in range(3):
        batcher.next_batch(4)
    state = batcher.state_dict()
    expected = [batcher.next_batch(4)["input_ids"] for _ in range(3)]
    resumed = _batcher(examples, 40, packing=True, pool_size=24)
    resumed.load_state_dict(state)
    assert all(resumed.next_batch(4)["input_ids"].equal(e) for e in expected)
    with pytest.raises(ValueError, match="predates row packing"):
        resumed.load_state_dict(state["stream"])  # a stream-only position, as checkpoints held before


def test_masking_is_per_example():
    L = 64
    batch = _batcher(random_examples(300, L, seed=2), L, packing=True, pool_size=64).next_batch(32)
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    slots = prediction_slots(L, 0.15, True)
    out = mask_tokens(ids, mask, SPECIALS, MASK, VOCAB, 0.15, 0.85, 0.0, slots, position_ids=positions)
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    rows = torch.arange(ids.shape[0])[:, None].expand_as(out["positions"])
    chosen[rows[out["weights"]], out["positions"][out["weights"]]] = True
    example = torch.cumsum((positions == 0) & (mask == 1), 1)
    for row in range(ids.shape[0]):
        for e in range(1, int(example[row].max()) + 1):
            inside = (example[row] == e) & (mask[row] == 1)
            candidates = int((inside & ~torch.isin(ids[row], SPECIALS)).sum())
            expected = min(candidates, max(1, round(candidates * 0.15)))
            assert int((chosen[row] & inside).sum()) == expected
    assert not torch.isin(ids[chosen], SPECIALS).any()


def test_block_diagonal_mask_keeps_examples_apart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    allowed = block_diagonal_mask(mask, positions, torch.float32)[0, 0] == 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:3, :3] = True
    expected[3:, 3:5] = True  # the second example; padding rows see it too (finite, never read)
    assert allowed.equal(expected)


def _per_example_losses(generator, discriminator, batch, masked_ids, disc_ids, chosen):
    """Per example: the MLM loss summed over its masked positions and the RTD loss averaged over its tokens."""
    inputs = encoder_inputs(batch["attention_mask"], batch["token_type_ids"], batch.get("position_ids"),
                            batch.get("unpad_plan"), discriminator.electra.embeddings.word_embeddings.weight)
    hidden = generator.electra(masked_ids, **inputs).last_hidden_state
    logits = generator.generator_lm_head(generator.generator_predictions(hidden))  # (B, L, V)
    mlm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten(), reduction="none")
    rtd_logits = discriminator(disc_ids, **inputs).logits
    labels = (disc_ids != batch["input_ids"]).float()
    rtd = torch.nn.functional.binary_cross_entropy_with_logits(rtd_logits, labels, reduction="none").flatten()
    mask = batch["attention_mask"]
    starts = (batch.get("position_ids", torch.ones_like(mask)) == 0) & (mask == 1)
    starts[:, 0] = True
    example = torch.cumsum(starts.flatten(), 0) - 1  # examples numbered in order; padding joins its row's last
    real = mask.flatten().bool()
    count = int(example[real].max()) + 1
    mlm_sum = mlm.new_zeros(count).index_add(0, example[chosen.flatten()], mlm[chosen.flatten()])
    rtd_mean = rtd.new_zeros(count).index_add(0, example[real], rtd[real]) / torch.bincount(example[real])
    return mlm_sum, rtd_mean


def _corrupt(batch, seed):
    """The same per-example masking and replacements in any layout: a generator seeded by the example's ids."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    replaced = ids.clone()
    positions = batch.get("position_ids", torch.arange(ids.shape[1]).expand_as(ids))
    for row in range(ids.shape[0]):
        starts = ((positions[row] == 0) & (mask[row] == 1)).nonzero().flatten().tolist() + [int(mask[row].sum())]
        for start, end in zip(starts, starts[1:], strict=False):
            key = hash((seed, tuple(ids[row, start:end].tolist())))
            g = torch.Generator().manual_seed(key % 2**31)
            inside = torch.rand(end - start, generator=g) < 0.3
            inside &= ~torch.isin(ids[row, start:end], SPECIALS)
            chosen[row, start:end] = inside
            replaced[row, start:end] = torch.where(inside, torch.randint(10, VOCAB, (end - start,), generator=g),
                                                   ids[row, start:end])
    return chosen, torch.where(chosen, MASK, ids), replaced


class _VocabOnlyTokenizer:
    """What build_models reads of a tokenizer."""

    pad_token_id = PAD

    def __len__(self):
        return VOCAB


def _kernel_fields(max_seq_len: int) -> dict:
    # No dropout; one head of 32 so that the attention kernel takes the models too.
    return {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "max_position_embeddings": max_seq_len,
            "num_attention_heads": 1, "hidden_size": 32}


def _on(batch: dict, device: str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_packed_row_equals_one_example_per_row(path, device):
    """A packed row's per-example RTD and MLM losses, and all gradients, equal the same examples one per row (fp32).

    reference: stock transformers models, packed rows kept apart by the block-diagonal mask. kernels: the models
    patched with every kernel (compiled on a GPU, else in Triton's interpreter), packed rows with the loader's
    unpad_plan (the patched
    encoder unpads once and runs varlen attention per example).
    """
    if path == "kernels" and device == "cpu" and not _dispatch.INTERPRET:
        pytest.skip("runs the kernels on a GPU or in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")
    L = 32
    examples = random_examples(5, 14, seed=3)
    fields = _kernel_fields(L)
    torch.manual_seed(0)
    generator, discriminator = build_models({**MICRO_MODEL, **fields}, {**MICRO_GENERATOR, **fields},
                                            _VocabOnlyTokenizer())
    previous = _dispatch.get_kernel_mode()
    generator.to(device)
    discriminator.to(device)
    if path == "kernels":
        _dispatch.set_kernel_mode("auto")
        electra_triton.patch(generator)
        electra_triton.patch(discriminator)
    try:
        padded = _batcher(examples, L, packing=False).collate([[e] for e in examples])
        packer = _batcher(examples, L, packing=True, plan=accepts_unpad_plan(generator))
        assert accepts_unpad_plan(discriminator) == (path == "kernels")
        rows, at, lengths = [[]], 0, [ListStream.example_length(e) for e in examples]
        for example, length in zip(examples, lengths, strict=True):
            if at + length > L:
                rows.append([])
                at = 0
            rows[-1].append(example)
            at += length
        packed = packer.collate(rows)
        assert len(rows) < len(examples)
        # Through the kernels, packed rows travel with the loader's plan: varlen attention, each example to itself.
        assert ("unpad_plan" in packed) == (path == "kernels")
        results = []
        for batch in (padded, packed):
            chosen, masked_ids, disc_ids = (t.to(device) for t in _corrupt(batch, seed=7))
            batch = _on(batch, device)
            generator.zero_grad()
            discriminator.zero_grad()
            mlm, rtd = _per_example_losses(generator, discriminator, batch, masked_ids, disc_ids, chosen)
            (mlm.sum() + 50 * rtd.sum()).backward()
            grads = {name: p.grad.clone() for model in (generator, discriminator)
                     for name, p in model.named_parameters() if p.grad is not None}
            results.append((mlm.detach(), rtd.detach(), grads))
        (mlm_padded, rtd_padded, grads_padded), (mlm_packed, rtd_packed, grads_packed) = results
        torch.testing.assert_close(mlm_packed, mlm_padded, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rtd_packed, rtd_padded, rtol=1e-5, atol=1e-5)
        assert grads_packed.keys() == grads_padded.keys() and len(grads_padded) > 10
        for name, grad in grads_padded.items():
            torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        _dispatch.set_kernel_mode(previous)


def test_packing_choice():
    from electra_triton.pretrain.train import RunError, choose_packing

    said = []
    for packing, kernels, plan, expected in (("auto", False, False, True), ("auto", True, True, True),
                                             ("auto", True, False, False), ("off", False, False, False),
                                             ("on", False, False, True)):
        config = type("Config", (), {"packing": packing, "max_seq_len": 32})()
        assert choose_packing(config, kernels, plan, said.append) is expected
    assert "block-diagonal" in said[0] and "unpad_plan" in said[1] and "takes no unpad_plan" in said[2]
    with pytest.raises(RunError, match="--packing off"):
        choose_packing(type("Config", (), {"packing": "on", "max_seq_len": 32})(), True, False, said.append)


def test_pretrainer_step_on_packed_rows_kernels_and_reference_agree(device):
    """The production forward (ElectraPretrainer) on a packed batch: the models patched with the kernels (compiled,
    or in the interpreter; the loader's unpad_plan) and the stock ones (block-diagonal mask) give the same losses and
    gradients from the same seed."""
    from electra_triton.pretrain.model import ElectraPretrainer

    if device == "cpu" and not _dispatch.INTERPRET:
        pytest.skip("runs the kernels on a GPU or in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")
    L = 32
    fields = _kernel_fields(L)

    previous = _dispatch.get_kernel_mode()
    _dispatch.set_kernel_mode("auto")
    try:
        results = []
        for kernels in (False, True):
            torch.manual_seed(0)
            generator, discriminator = build_models({**MICRO_MODEL, **fields}, {**MICRO_GENERATOR, **fields},
                                                    _VocabOnlyTokenizer())
            if kernels:
                electra_triton.patch(generator)
                electra_triton.patch(discriminator)
            # The fused head samples with in-kernel Philox noise, the reference with torch.rand: at a vanishing
            # temperature both take the argmax, so both paths replace the same tokens and the losses are comparable.
            model = ElectraPretrainer(generator, discriminator, SPECIALS.tolist(), MASK, max_seq_len=L,
                                      packing=True, temperature=1e-6).to(device)
            batch = _batcher(random_examples(40, L, seed=4), L, packing=True, pool_size=16,
                             plan=accepts_unpad_plan(generator)).next_batch(4)
            assert ("unpad_plan" in batch) == kernels
            torch.manual_seed(1)
            out = model(**_on(batch, device))
            out["loss"].backward()
            results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (reference, reference_grads), (fused, fused_grads) = results
        for key in ("mlm_loss", "rtd_loss", "loss"):
            torch.testing.assert_close(fused[key], reference[key], rtol=1e-5, atol=1e-5)
        for key in ("mlm_count", "rtd_count", "replaced"):
            assert fused[key] == reference[key]
        for name, grad in reference_grads.items():
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        _dispatch.set_kernel_mode(previous)


@pytest.mark.slow
def test_pretrain_packs_through_the_kernels(tmp_path, device, capsys):
    """`pretrain` with the kernels (compiled, or in the interpreter): packing on by default, the loader's plan
    carried to the encoders by the training loop."""
    import json

    from test_pretrain_data import micro_config

    from electra_triton.pretrain import run

    if device == "cpu" and not _dispatch.INTERPRET:
        pytest.skip("runs the kernels on a GPU or in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")
    heads = {"num_attention_heads": 1, "hidden_size": 32}  # a head dim the attention kernel takes
    cfg = micro_config(tmp_path, kernels="auto", device="auto", max_steps=2, discriminator={**MICRO_MODEL, **heads},
                       generator={**MICRO_GENERATOR, **heads})
    previous = _dispatch.get_kernel_mode()
    try:
        assert run(cfg) == 0
    finally:
        _dispatch.set_kernel_mode(previous)
    said = capsys.readouterr().err
    assert "packing: on" in said and "through the encoder's unpad_plan" in said
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["split"] == "train"]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["fill"] > 0.9 for m in metrics)
