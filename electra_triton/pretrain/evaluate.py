"""Held-out evaluation of a pre-training run: which documents, the batches, and one evaluation pass.

The held-out share is either the first K documents of the training corpus (or of the prepared `--data`) in corpus
order (`--eval-docs K`; training never reads them) or the first K documents of a separate corpus (`--eval-corpus
PATHS`). By default K is
DEFAULT_EVAL_DOCS, but at most a tenth of the corpus; a corpus too small for that runs without evaluation, with a
warning.

The held-out batches are built once and kept (on the CPU); every evaluation runs them in the same order with a
torch.Generator seeded alike, so every evaluation masks the same positions and draws the same sampling noise: the
metrics of two evaluations differ only because the model did. Evaluation runs in eval() mode (no dropout) under
no_grad. Under DDP or FSDP each rank evaluates its own documents (the stream's rank sharding), ranks with fewer
batches run empty ones (FSDP gathers parameters collectively per batch), and the sums of all ranks are reduced with
one all_reduce (see metrics.py, which also says how the AUC reduces).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .data import EndOfSplit, count_documents, resolve_corpus
from .metrics import EvalTotals
from .step import to_device

DEFAULT_EVAL_DOCS = 250
_MIN_SHARE = 10  # the default held-out share is at most 1/_MIN_SHARE of the corpus


@dataclasses.dataclass
class EvalPlan:
    """Evaluation reads the first `docs` documents of `eval_sources` (a separate corpus) or, when that is None, of the
    training data, whose first `train_held_out` documents training then skips. docs == 0: evaluation is off."""

    docs: int
    train_held_out: int
    eval_sources: list[tuple[str, str]] | None = None


def plan_evaluation(eval_docs: int | None, eval_corpus: list[str] | None, count_training_docs: Callable[[int], int],
                    warn: Callable[[str], None]) -> EvalPlan:
    """The held-out share for --eval-docs (None: the default) and --eval-corpus; count_training_docs(limit) counts the
    training data's documents up to `limit`."""
    if eval_corpus:
        eval_sources = resolve_corpus(eval_corpus)
        docs = DEFAULT_EVAL_DOCS if eval_docs is None else eval_docs
        if docs and count_documents(eval_sources, 1) == 0:
            raise ValueError(f"--eval-corpus {' '.join(eval_corpus)} holds no documents: pass non-empty files")
        return EvalPlan(docs, 0, eval_sources)
    if eval_docs is not None:  # explicit; the training stream checks that documents are left to train on
        return EvalPlan(eval_docs, eval_docs)
    available = count_training_docs(DEFAULT_EVAL_DOCS * _MIN_SHARE)
    docs = min(DEFAULT_EVAL_DOCS, available // _MIN_SHARE)
    if docs == 0:
        warn(f"evaluation is off: the corpus has only {available} documents, too few to hold out a tenth of them. "
             "Pass --eval-docs K to hold out K anyway, or --eval-corpus PATHS to evaluate on other text")
    return EvalPlan(docs, docs)


def read_once(stream) -> list[Any]:
    """The examples of an eval-split stream, once: to EndOfSplit (ExampleStream), or to the end of its first epoch
    (a prepared-data stream, which wraps around; build it with shuffle_buffer=1 so that no example is held back)."""
    examples = []
    while True:
        try:
            example = stream.next_example()
        except EndOfSplit:
            return examples
        if stream.epoch > 0:
            return examples
        examples.append(example)


class Evaluator:
    """One evaluation pass over fixed held-out batches: evaluate(model) -> EvalTotals reduced over ranks."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], num_passes: int, max_seq_len: int, vocab_size: int,
                 seed: int, device: torch.device, distributed: bool):
        self.batches = batches
        self.max_seq_len = max_seq_len
        self.num_passes = num_passes  # >= len(batches): the batch count of the rank with the most
        self.vocab_size = vocab_size
        self.seed = seed
        self.device = device
        self.distributed = distributed

    @classmethod
    def build(cls, stream, batcher, batch_size: int, max_seq_len: int, vocab_size: int, seed: int,
              device: torch.device, distributed: bool) -> "Evaluator | None":
        """This rank's held-out batches from an eval-split `stream`, one example per row (`batcher.collate`, a
        packing.Batcher over the stream); None when no rank has any (then evaluation is off)."""
        examples = read_once(stream)
        batches = [batcher.collate([[example] for example in examples[start: start + batch_size]])
                   for start in range(0, len(examples), batch_size)]
        counts = torch.tensor([len(batches), len(batches)], dtype=torch.long)
        if distributed:
            counts = counts.to(device)
            dist.all_reduce(counts[:1], op=dist.ReduceOp.MAX)
            dist.all_reduce(counts[1:], op=dist.ReduceOp.SUM)
        most, total = counts.tolist()
        if total == 0:
            return None
        return cls(batches, most, max_seq_len, vocab_size, seed, device, distributed)

    @property
    def num_examples(self) -> int:
        return sum(len(batch["input_ids"]) for batch in self.batches)

    def _empty_batch(self) -> dict[str, torch.Tensor]:
        # One row of padding: masks nothing and adds nothing to any sum, but runs the model's collectives.
        return {key: torch.zeros(1, self.max_seq_len, dtype=torch.long)
                for key in ("input_ids", "token_type_ids", "attention_mask")}

    def evaluate(self, model: torch.nn.Module, autocast: Callable[[], Any]) -> EvalTotals:
        """Run every held-out batch through `model` (an ElectraPretrainer, unwrapped from DDP) and reduce the sums."""
        was_training = model.training
        model.eval()
        rng = torch.Generator(device=self.device).manual_seed(self.seed)
        totals = EvalTotals(self.vocab_size, self.device)
        try:
            with torch.no_grad():
                for index in range(self.num_passes):
                    batch = self.batches[index] if index < len(self.batches) else self._empty_batch()
                    batch = to_device(batch, self.device)
                    with autocast():
                        out = model(**batch, rng=rng)
                    totals.add(out, batch["attention_mask"])
        finally:
            model.train(was_training)
        if self.distributed:
            vector = totals.as_vector()
            dist.all_reduce(vector)
            totals.load_vector(vector)
        return totals
