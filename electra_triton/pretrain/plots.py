"""PNG curves of pre-training runs, from their metrics.jsonl: `electra-triton plot RUN_DIR [RUN_DIR ...] [--out DIR]`.

Three figures, each run one line in every panel (shared axes, so several runs compare at a glance):
- loss.png: the training loss and its parts (loss = mlm_loss + rtd_weight * rtd_loss);
- eval.png: the held-out metrics (disc AUC, precision, recall; generator MLM accuracy);
- throughput.png: training tokens/s, and the padding fill of the batches when the run logged one ("fill").
The training run writes them into OUTPUT_DIR/plots at every checkpoint and at the end. matplotlib is optional: without
it the run writes no PNG (it says so once) and `electra-triton plot` exits with the command that installs it.
"""

import argparse
import json
import pathlib
import sys
from typing import Any

METRICS = "metrics.jsonl"
FIGURES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    # file: (split, ((key, panel title), ...))
    "loss.png": ("train", (("loss", "training loss"), ("mlm_loss", "generator MLM loss"),
                           ("rtd_loss", "discriminator RTD loss"))),
    "eval.png": ("eval", (("disc_auc", "held-out disc AUC"), ("disc_precision", "held-out disc precision"),
                          ("disc_recall", "held-out disc recall"), ("mlm_accuracy", "held-out MLM accuracy"))),
    "throughput.png": ("train", (("tokens_per_s", "training tokens/s"), ("fill", "batch fill (real tokens)"))),
}


class PlotError(ValueError):
    """A run folder cannot be plotted; the message says why."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    """Whether PNGs can be written (matplotlib importable)."""
    return _pyplot() is not None


def load_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl; rows without "split" (older runs) are training rows."""
    path = pathlib.Path(run_dir) / METRICS
    if not path.is_file():
        raise PlotError(f"{run_dir} has no {METRICS}: pass the --output-dir of an `electra-triton pretrain` run")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append({"split": "train", **json.loads(line)})
        except json.JSONDecodeError as error:
            raise PlotError(f"{path}: line {number} is not JSON ({error.msg})") from error
    return rows


def plot_runs(runs: dict[str, list[dict[str, Any]]], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Write FIGURES for the runs (label -> metrics rows) into out_dir; the paths written (figures with no data and
    panels with no data are left out)."""
    plt = _pyplot()
    if plt is None:
        return []
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (split, panels) in FIGURES.items():
        series = {key: {label: [(row["step"], row[key]) for row in rows if row["split"] == split and key in row]
                        for label, rows in runs.items()} for key, _ in panels}
        shown = [(key, title) for key, title in panels if any(series[key].values())]
        if not shown:
            continue
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
        for axis, (key, title) in zip(axes[0], shown, strict=True):
            for index, (label, points) in enumerate(series[key].items()):
                if points:
                    steps, values = zip(*points, strict=True)
                    axis.plot(steps, values, marker="o" if split == "eval" else None, markersize=3,
                              color=f"C{index % 10}", label=label)
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_run_plots(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """RUN_DIR/plots/*.png of one run."""
    run = pathlib.Path(run_dir)
    return plot_runs({run.name or str(run): load_metrics(run)}, run / "plots")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="electra-triton plot", description="Draw the curves of pre-training runs (their metrics.jsonl) as PNGs; "
        "several runs share the axes of every panel.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="--output-dir of `electra-triton pretrain`")
    parser.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots for one run, ./plots for several)")
    args = parser.parse_args(argv)
    try:
        # Labels are the folders' names, or their paths as given where names repeat.
        names = [pathlib.Path(d).resolve().name for d in args.run_dirs]
        labels = names if len(set(names)) == len(names) else args.run_dirs
        runs = {label: load_metrics(run_dir) for label, run_dir in zip(labels, args.run_dirs, strict=True)}
    except PlotError as error:
        print(f"electra-triton plot: error: {error}", file=sys.stderr)
        return 2
    if not available():
        print("electra-triton plot: error: matplotlib is not installed: pip install matplotlib", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.run_dirs[0]) / "plots" \
        if len(args.run_dirs) == 1 else pathlib.Path("plots")
    written = plot_runs(runs, out)
    if not written:
        print(f"electra-triton plot: error: no metric rows to plot in {', '.join(args.run_dirs)}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
