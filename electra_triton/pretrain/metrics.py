"""google-research/electra's evaluation metrics (run_pretraining.py, metric_fn), accumulated as sums on the device.

What each metric is, as the original defines it:
- mlm_accuracy: the generator's argmax equals the original token, over the masked positions;
- mlm_loss: the generator's cross-entropy, mean over the masked positions;
- sampled_accuracy: the generator's sample (the token the discriminator sees) equals the original, masked positions;
- disc_accuracy: the discriminator's call (p(replaced) > 0.5) is right, over all real (non-padding) tokens;
- disc_precision: share of the tokens called replaced that were replaced;
- disc_recall: share of the replaced tokens called replaced;
- disc_auc: ROC AUC of p(replaced) over all real tokens (the original feeds padding to tf.metrics.auc as negatives
  scored 0, which inflates the AUC by the padding share; here padding is left out);
- replaced_fraction: share of the real tokens the generator's samples changed (the positive rate behind precision).
A ratio with an empty denominator is 0, as tf.metrics.accuracy gives; an AUC without positives or negatives is NaN.

Every quantity is a sum, so batches, evaluations on several ranks, and DDP all reduce with one all_reduce of one
float64 vector. The AUC is computed from a fixed-bin histogram of the discriminator's logit (AUC_BINS bins over
[-AUC_LOGIT_RANGE, AUC_LOGIT_RANGE], clamped at the ends) per class, so it reduces as a sum too; two tokens in the
same bin count as a tie (half a correct pair). The logit scale is used because AUC depends on the ranking only and,
unlike the probability, it does not crowd near 0 and 1. With 8192 bins of width ~0.005 in logit the error against the
exact rank AUC is far below the metric's run-to-run noise (tested).
"""

import json
import math
import pathlib
from typing import Any

import torch

EVAL_KEYS = ("disc_auc", "disc_accuracy", "disc_precision", "disc_recall", "mlm_accuracy", "mlm_loss",
             "sampled_accuracy", "replaced_fraction")
AUC_BINS = 8192
AUC_LOGIT_RANGE = 20.0
_SUMS = ("mlm_correct", "sampled_correct", "mlm_loss_sum", "masked", "true_pos", "false_pos", "false_neg",
         "true_neg")


def logit_bins(logits: torch.Tensor, bins: int = AUC_BINS, logit_range: float = AUC_LOGIT_RANGE) -> torch.Tensor:
    """The histogram bin of each logit: `bins` equal bins over [-logit_range, logit_range], outliers in the end bins."""
    scaled = (logits.float() + logit_range) * (bins / (2 * logit_range))
    return scaled.floor().clamp(0, bins - 1).long()


def binned_auc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """ROC AUC from per-bin counts of positives and negatives (bins in score order); a shared bin is a tie (1/2)."""
    positives, negatives = positives.double(), negatives.double()
    total_pos, total_neg = positives.sum().item(), negatives.sum().item()
    if total_pos == 0 or total_neg == 0:
        return math.nan
    negatives_below = negatives.cumsum(0) - negatives
    correct_pairs = (positives * (negatives_below + 0.5 * negatives)).sum().item()
    return correct_pairs / (total_pos * total_neg)


class EvalTotals:
    """Sums of one evaluation over batches (and ranks): add() per batch without a host sync, then metrics()."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self.auc_positives = torch.zeros(AUC_BINS, dtype=torch.float64, device=device)
        self.auc_negatives = torch.zeros(AUC_BINS, dtype=torch.float64, device=device)
        # How often each token is a masked target: the unigram baseline of mlm_accuracy (predict the most frequent).
        self.target_counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> None:
        """Add a batch: `out` is what ElectraPretrainer.forward returned for it."""
        weights = out["weights"]  # (B, P): the masked slots in use
        targets = out["targets"]
        real = attention_mask == 1  # (B, L)
        replaced = out["rtd_labels"] == 1
        called = out["disc_logits"] > 0
        masked = weights.sum()
        self.sums += torch.stack([
            ((out["mlm_predictions"] == targets) & weights).sum(),
            ((out["sampled"] == targets) & weights).sum(),
            out["mlm_loss"].double() * masked,
            masked,
            (called & replaced & real).sum(),
            (called & ~replaced & real).sum(),
            (~called & replaced & real).sum(),
            (~called & ~replaced & real).sum(),
        ]).double()
        bins = logit_bins(out["disc_logits"]).flatten()
        self.auc_positives.index_add_(0, bins, (replaced & real).flatten().double())
        self.auc_negatives.index_add_(0, bins, (~replaced & real).flatten().double())
        self.target_counts.index_add_(0, targets.flatten(), weights.flatten().double())

    def as_vector(self) -> torch.Tensor:
        """Everything as one float64 vector, for a single all_reduce."""
        return torch.cat([self.sums, self.auc_positives, self.auc_negatives, self.target_counts])

    def load_vector(self, vector: torch.Tensor) -> None:
        self.sums, self.auc_positives, self.auc_negatives, self.target_counts = vector.split(
            [len(_SUMS), AUC_BINS, AUC_BINS, self.vocab_size])

    def metrics(self) -> dict[str, float]:
        """The EVAL_KEYS metrics of the batches added (syncs once)."""
        sums = dict(zip(_SUMS, self.sums.tolist(), strict=True))
        real = sums["true_pos"] + sums["false_pos"] + sums["false_neg"] + sums["true_neg"]
        replaced = sums["true_pos"] + sums["false_neg"]
        return {
            "disc_auc": binned_auc(self.auc_positives, self.auc_negatives),
            "disc_accuracy": _ratio(sums["true_pos"] + sums["true_neg"], real),
            "disc_precision": _ratio(sums["true_pos"], sums["true_pos"] + sums["false_pos"]),
            "disc_recall": _ratio(sums["true_pos"], replaced),
            "mlm_accuracy": _ratio(sums["mlm_correct"], sums["masked"]),
            "mlm_loss": _ratio(sums["mlm_loss_sum"], sums["masked"]),
            "sampled_accuracy": _ratio(sums["sampled_correct"], sums["masked"]),
            "replaced_fraction": _ratio(replaced, real),
        }

    def unigram_accuracy(self) -> float:
        """mlm_accuracy of always predicting the most frequent masked token of these batches."""
        return _ratio(self.target_counts.max().item(), self.target_counts.sum().item())

    def token_count(self) -> int:
        """Real tokens evaluated."""
        return int(self.sums[4:].sum().item())


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


class MetricsLog:
    """Where metric rows go: OUTPUT_DIR/metrics.jsonl (always) and TensorBoard (--report-to tensorboard).

    A row is {"step": N, "split": "train" | "eval", name: value, ...}; TensorBoard gets each value as "<split>/<name>".
    """

    def __init__(self, path: pathlib.Path, tensorboard_dir: pathlib.Path | None = None, resumed_step: int = 0):
        self.file = open(path, "a")  # noqa: SIM115 (open for the run's length, closed by close())
        self.writer = None
        if tensorboard_dir is not None:
            # purge_step drops events a resumed run is about to write again (those after its checkpoint).
            self.writer = tensorboard_writer()(log_dir=str(tensorboard_dir), purge_step=resumed_step or None)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in row.items():
                if name not in ("step", "split") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{row['split']}/{name}", value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer():
    """torch's SummaryWriter; ValueError naming the fix when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard (or leave "
                         "--report-to out; metrics.jsonl and the plots are written either way)") from error
    return SummaryWriter
