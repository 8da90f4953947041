"""Held-out evaluation: each metric against a hand computation, the AUC (ties, binning, reduction), the held-out
split of the data, deterministic evaluation passes, the metrics log, and the command's refusals and warnings."""

import contextlib
import json
import sys

import pytest
import torch
from test_pretrain_data import corpus_and_tokenizer, micro_config, write_corpus  # noqa: F401 (fixture)
from test_pretrain_model import _pretrainer

from electra_triton.pretrain import main
from electra_triton.pretrain.data import (
    CorpusError,
    EndOfSplit,
    ExampleStream,
    count_documents,
    read_documents,
    resolve_corpus,
)
from electra_triton.pretrain.evaluate import DEFAULT_EVAL_DOCS, EvalPlan, Evaluator, plan_evaluation, read_once
from electra_triton.pretrain.metrics import (
    AUC_BINS,
    EVAL_KEYS,
    EvalTotals,
    MetricsLog,
    binned_auc,
    logit_bins,
    tensorboard_writer,
)
from electra_triton.pretrain.packing import Batcher


def _outputs(disc_logits, rtd_labels, predictions, sampled, targets, weights, mlm_loss):
    return {"disc_logits": torch.tensor(disc_logits), "rtd_labels": torch.tensor(rtd_labels),
            "mlm_predictions": torch.tensor(predictions), "sampled": torch.tensor(sampled),
            "targets": torch.tensor(targets), "weights": torch.tensor(weights), "mlm_loss": torch.tensor(mlm_loss)}


# One sequence of 6 positions, the last padding; 3 masked slots, the last unused.
HAND_CASE = _outputs(
    disc_logits=[[-3.0, 2.0, -1.0, 0.5, -2.0, 4.0]],  # called replaced (> 0) at 1, 3 and 5 (5 is padding)
    rtd_labels=[[0, 1, 1, 0, 0, 0]],  # replaced at 1 and 2
    predictions=[[7, 8, 9]], sampled=[[7, 5, 9]], targets=[[7, 6, 9]], weights=[[True, True, False]],
    mlm_loss=2.5,
)
HAND_MASK = torch.tensor([[1, 1, 1, 1, 1, 0]])


def test_each_metric_matches_a_hand_computation():
    totals = EvalTotals(vocab_size=10, device=torch.device("cpu"))
    totals.add(HAND_CASE, HAND_MASK)
    metrics = totals.metrics()
    assert list(metrics) == list(EVAL_KEYS)
    # Real tokens 0..4: replaced {1, 2}, called {1, 3}: TP 1 (1), FP 1 (3), FN 1 (2), TN 2 (0, 4).
    assert metrics["disc_accuracy"] == pytest.approx(3 / 5)
    assert metrics["disc_precision"] == pytest.approx(1 / 2)
    assert metrics["disc_recall"] == pytest.approx(1 / 2)
    assert metrics["replaced_fraction"] == pytest.approx(2 / 5)
    # Positives score 2 and -1, negatives -3, 0.5, -2: of 6 pairs, 2 beats all 3, -1 beats -3 and -2 -> 5/6.
    assert metrics["disc_auc"] == pytest.approx(5 / 6)
    # Slots in use: 0 (predicted 7 = target, sampled 7 = target) and 1 (predicted 8 != 6, sampled 5 != 6).
    assert metrics["mlm_accuracy"] == pytest.approx(1 / 2)
    assert metrics["sampled_accuracy"] == pytest.approx(1 / 2)
    assert metrics["mlm_loss"] == pytest.approx(2.5)
    assert totals.unigram_accuracy() == pytest.approx(1 / 2)  # targets 7 and 6, once each
    assert totals.token_count() == 5


def test_mlm_loss_is_the_mean_over_all_masked_positions_not_over_batches():
    totals = EvalTotals(vocab_size=10, device=torch.device("cpu"))
    totals.add(HAND_CASE, HAND_MASK)  # 2 masked positions, mean loss 2.5
    three_slots = {**HAND_CASE, "weights": torch.tensor([[True, True, True]]), "mlm_loss": torch.tensor(1.0)}
    totals.add(three_slots, HAND_MASK)  # 3 masked positions, mean loss 1.0
    assert totals.metrics()["mlm_loss"] == pytest.approx((2 * 2.5 + 3 * 1.0) / 5)


def test_auc_counts_a_tie_as_half_a_pair():
    # Positives score 0.4 and 0.8, negatives 0.1 and 0.4 (a tie): 1 + 0.5 + 1 + 1 of 4 pairs.
    logits = torch.tensor([0.4, 0.8, 0.1, 0.4])
    labels = torch.tensor([True, True, False, False])
    bins = logit_bins(logits)
    positives = torch.bincount(bins[labels], minlength=AUC_BINS)
    negatives = torch.bincount(bins[~labels], minlength=AUC_BINS)
    assert binned_auc(positives, negatives) == pytest.approx(3.5 / 4)
    # All scores equal: every pair a tie.
    same = logit_bins(torch.zeros(4))
    assert binned_auc(torch.bincount(same[:2], minlength=AUC_BINS),
                      torch.bincount(same[2:], minlength=AUC_BINS)) == pytest.approx(0.5)
    # One class missing: undefined.
    assert torch.isnan(torch.tensor(binned_auc(torch.ones(4), torch.zeros(4))))


def _exact_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    positives, negatives = scores[labels], scores[~labels]
    pairs = (positives[:, None] > negatives[None, :]).double() + 0.5 * (positives[:, None] == negatives[None, :])
    return pairs.mean().item()


def test_binned_auc_matches_the_exact_rank_auc():
    torch.manual_seed(0)
    labels = torch.rand(4000) < 0.15
    logits = torch.randn(4000) * 3 + labels * 2.0  # overlapping classes, tails beyond the binned range
    logits[:5] = 30.0
    bins = logit_bins(logits)
    auc = binned_auc(torch.bincount(bins[labels], minlength=AUC_BINS),
                     torch.bincount(bins[~labels], minlength=AUC_BINS))
    exact = _exact_auc(logits, labels)
    assert 0.6 < exact < 0.8
    assert auc == pytest.approx(exact, abs=1e-3)


def test_sums_reduce_across_ranks_as_one_vector():
    # What the all_reduce does: adding two ranks' vectors gives the totals of both ranks' batches.
    torch.manual_seed(0)

    def random_batch():
        return _outputs(torch.randn(2, 6).tolist(), (torch.rand(2, 6) < 0.3).long().tolist(),
                        torch.randint(10, (2, 3)).tolist(), torch.randint(10, (2, 3)).tolist(),
                        torch.randint(10, (2, 3)).tolist(), (torch.rand(2, 3) < 0.7).tolist(), 1.7)

    first, second = random_batch(), random_batch()
    mask = torch.ones(2, 6, dtype=torch.long)
    rank0, rank1, both = (EvalTotals(10, torch.device("cpu")) for _ in range(3))
    rank0.add(first, mask)
    rank1.add(second, mask)
    both.add(first, mask)
    both.add(second, mask)
    rank0.load_vector(rank0.as_vector() + rank1.as_vector())
    assert rank0.metrics() == pytest.approx(both.metrics(), nan_ok=True)
    assert rank0.unigram_accuracy() == both.unigram_accuracy()


# --------------------------------------------------------------------------------------------------- the split


def _documents(stream: ExampleStream, examples: int = 800) -> set[str]:
    """The words of every example the stream yields (train: `examples` of them; eval: to the end), [CLS]/[SEP] too."""
    seen = {"[CLS]", "[SEP]"}
    for _ in range(examples):
        try:
            first, second = stream.next_example()
        except EndOfSplit:
            break
        seen.update(stream.tokenizer.convert_ids_to_tokens(first + second))
    return seen


def test_held_out_documents_are_never_trained_on(tmp_path):
    # Documents made of disjoint words, so that an example tells which document it came from.
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"held{i} held{i} held{i}" if i < 3 else f"train{i} train{i}" for i in range(12)))
    from electra_triton.pretrain.data import train_tokenizer

    sources = resolve_corpus([str(path)])
    tokenizer = train_tokenizer(sources, 100, 100, 16)
    held = {f"held{i}" for i in range(3)}
    train = ExampleStream(sources, tokenizer, 16, seed=0, shuffle_buffer=4, held_out_docs=3)
    assert not held & _documents(train)  # several epochs: never a held-out word
    assert {f"train{i}" for i in range(3, 12)} <= _documents(train)
    eval_words = _documents(ExampleStream(sources, tokenizer, 16, held_out_docs=3, split="eval"))
    assert eval_words - {"[CLS]", "[SEP]"} == held
    # Ranks split the held-out documents between them.
    shards = [_documents(ExampleStream(sources, tokenizer, 16, rank=r, world_size=2, held_out_docs=3, split="eval"))
              for r in range(2)]
    assert shards[0] - {"[CLS]", "[SEP]"} == {"held0", "held2"} and shards[1] - {"[CLS]", "[SEP]"} == {"held1"}
    with pytest.raises(CorpusError, match="leaves none to train on"):
        ExampleStream(sources, tokenizer, 16, held_out_docs=12)


def test_eval_split_reads_the_same_batches_every_time(corpus_and_tokenizer):  # noqa: F811
    sources, tokenizer = corpus_and_tokenizer

    def read():
        return read_once(ExampleStream(sources, tokenizer, 32, seed=3, held_out_docs=10, split="eval"))

    first, second = read(), read()
    assert len(first) > 10 and first == second
    # The first 10 documents only: their tokens and no others.
    kind, path = sources[0]
    documents = [sentences for sentences, _ in read_documents(kind, path)]
    held = {i for doc in documents[:10] for ids in tokenizer(doc, add_special_tokens=False)["input_ids"] for i in ids}
    seen = {i for a, b in first for i in a + b}
    assert seen <= held and len(seen) > len(held) / 2  # packing truncates a little


def test_default_share_is_capped_and_off_on_a_tiny_corpus(tmp_path):
    warnings = []

    def counter(documents: int):
        sources = resolve_corpus([write_corpus(tmp_path / str(documents), documents=documents)])
        return lambda limit: count_documents(sources, limit)

    assert plan_evaluation(None, None, counter(9), warnings.append).docs == 0
    assert "evaluation is off: the corpus has only 9 documents" in warnings[0]
    assert plan_evaluation(None, None, counter(60), warnings.append) == EvalPlan(6, 6)
    assert plan_evaluation(None, None, counter(DEFAULT_EVAL_DOCS * 11), warnings.append).docs == DEFAULT_EVAL_DOCS
    assert plan_evaluation(4, None, counter(9), warnings.append) == EvalPlan(4, 4)  # explicit: as asked
    other = plan_evaluation(5, [str(tmp_path / "60")], counter(9), warnings.append)
    assert other == EvalPlan(5, 0, resolve_corpus([str(tmp_path / "60")]))
    assert len(warnings) == 1


# --------------------------------------------------------------------------------------------------- evaluation


def test_every_evaluation_masks_alike_and_leaves_training_state_alone(corpus_and_tokenizer):  # noqa: F811
    sources, tokenizer = corpus_and_tokenizer
    model = _pretrainer()
    model.train()
    stream = ExampleStream(sources, tokenizer, 32, held_out_docs=8, split="eval")
    batcher = Batcher(stream, 32, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    evaluator = Evaluator.build(stream, batcher, 4, 32, model.generator.config.vocab_size, 0, torch.device("cpu"),
                                False)
    assert len(evaluator.batches) > 1
    torch.manual_seed(5)
    first = evaluator.evaluate(model, contextlib.nullcontext)
    state = torch.get_rng_state()
    second = evaluator.evaluate(model, contextlib.nullcontext)
    assert torch.equal(state, torch.get_rng_state())  # the evaluation's own generator, not torch's
    assert model.training
    assert first.metrics() == pytest.approx(second.metrics())
    assert first.token_count() == sum(int(b["attention_mask"].sum()) for b in evaluator.batches) > 0
    metrics = first.metrics()
    assert 0 < metrics["replaced_fraction"] < 0.2 and metrics["mlm_loss"] > 0


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log.write({"step": 3, "split": "eval", "disc_auc": 0.8})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "split": "eval", "disc_auc": 0.8}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["eval/disc_auc"]
    assert events.Scalars("eval/disc_auc")[0].step == 3


def test_missing_tensorboard_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match="pip install tensorboard"):
        tensorboard_writer()
    assert main(["--report-to", "tensorboard", "--output-dir", str(tmp_path / "tb")]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


def test_cli_rejects_bad_eval_settings(tmp_path, capsys):
    assert main(["--eval-every", "0", "--output-dir", str(tmp_path / "a")]) == 2
    assert "--eval-every must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--eval-docs", "-1", "--output-dir", str(tmp_path / "b")]) == 2
    assert "--eval-docs must be >= 0" in capsys.readouterr().err
    cfg = micro_config(tmp_path)
    flags = ["--corpus", *cfg.corpus, "--vocab-size", "200", "--kernels", "reference", "--device", "cpu"]
    assert main([*flags, "--eval-docs", "60", "--output-dir", str(tmp_path / "c")]) == 2
    assert "holding out 60 documents for evaluation leaves none to train on" in capsys.readouterr().err
