"""A pre-training run's eval rows and PNGs end to end (micro model), `electra-triton plot` comparing two runs and its
refusals, the run without matplotlib, and `electra-triton bench`."""

import json
import shutil

import pytest
from test_pretrain_data import micro_config

from electra_triton import bench, cli
from electra_triton.pretrain import main as pretrain
from electra_triton.pretrain import plots
from electra_triton.pretrain.metrics import EVAL_KEYS

FIGURES = ["eval.png", "loss.png", "throughput.png"]


def _flags(tmp_path, out, *extra):
    cfg = micro_config(tmp_path)
    return ["--corpus", *cfg.corpus, "--output-dir", str(out), "--vocab-size", "200", "--max-seq-len", "32",
            "--batch-size", "2", "--log-every", "1", "--save-every", "2", "--kernels", "reference", "--device", "cpu",
            "--shuffle-buffer", "8", "--lr", "1e-3", "--warmup-steps", "1", "--eval-docs", "6",
            *[f"--{p}-{k.replace('_', '-')}={v}" for p, fields in (("disc", cfg.discriminator), ("gen", cfg.generator))
              for k, v in fields.items()], *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    out = tmp_path / "run"
    assert pretrain(_flags(tmp_path, out, "--max-steps", "3", "--eval-every", "2")) == 0
    return out


def test_run_writes_eval_rows_and_plots(run_dir, capsys):
    rows = _rows(run_dir)
    evals = [row for row in rows if row["split"] == "eval"]
    assert [row["step"] for row in evals] == [2, 3]  # every 2 steps and at the end
    assert all(set(row) == {"step", "split", *EVAL_KEYS} for row in evals)
    assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2, 3]
    assert 0 <= evals[-1]["disc_auc"] <= 1 and evals[-1]["mlm_loss"] > 0
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == FIGURES


def test_eval_resumes_with_the_run(run_dir, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-3")
    (resumed / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())  # as if stopped after step 3
    assert pretrain(["--output-dir", str(resumed), "--resume"]) == 0
    rows = _rows(resumed)
    # From the step-2 checkpoint: rows after it are dropped and written again, the eval at step 2 kept once.
    assert [(row["step"], row["split"]) for row in rows] == [
        (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (3, "eval")]
    original = {row["step"]: row for row in _rows(run_dir) if row["split"] == "eval"}
    again = {row["step"]: row for row in rows if row["split"] == "eval"}
    assert again[2] == original[2]
    # The resumed training is the original's, and the evaluation masks alike: the same step-3 metrics.
    assert again[3] == pytest.approx(original[3])


def test_plot_compares_two_runs(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"step": 1, "split": "train", "loss": 40.0, "mlm_loss": 9.0, "rtd_loss": 0.6, "tokens_per_s": 10.0,
         "fill": 0.5},
        {"step": 2, "split": "eval", **dict.fromkeys(EVAL_KEYS, 0.5)},
    ]))
    out = tmp_path / "compare"
    assert cli.main(["plot", str(run_dir), str(other), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == FIGURES
    assert capsys.readouterr().out.split() == [str(out / name) for name in ("loss.png", "eval.png", "throughput.png")]
    # Both runs are lines on the same axes: the legend of each figure names both.
    runs = {"run": plots.load_metrics(run_dir), "other": plots.load_metrics(other)}
    import matplotlib.pyplot as plt

    saved = []
    original_close = plt.close
    plt.close = lambda fig: saved.append(fig)
    try:
        plots.plot_runs(runs, tmp_path / "again")
    finally:
        plt.close = original_close
    for fig in saved:
        labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
        assert labels == ["run", "other"]
        original_close(fig)
    throughput = saved[-1]
    assert [axis.get_title() for axis in throughput.axes] == ["training tokens/s", "batch fill (real tokens)"]


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert f"{tmp_path} has no metrics.jsonl" in capsys.readouterr().err


def test_run_without_matplotlib_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    out = tmp_path / "run"
    assert pretrain(_flags(tmp_path, out, "--max-steps", "1", "--eval-docs", "0")) == 0
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1
    assert not (out / "plots").exists() and (out / "discriminator").is_dir()
    assert cli.main(["plot", str(out)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_bench_runs_a_suite_of_the_checkout_or_says_where(monkeypatch, capsys):
    assert bench.find_checkout() is not None
    assert {"kernels", "gpu"} <= set(bench.available_suites(bench.find_checkout()))  # a module, and a package
    assert cli.main(["bench"]) == 2
    assert "usage: electra-triton bench {kernels," in capsys.readouterr().err
    called = []
    import benchmarks.kernels

    monkeypatch.setattr(benchmarks.kernels, "main", lambda argv: called.append(argv) or 0)
    assert cli.main(["bench", "kernels", "--out", "x"]) == 0
    assert called == [["--out", "x"]]
    monkeypatch.setattr(bench, "find_checkout", lambda: None)
    assert cli.main(["bench", "kernels"]) == 2
    assert "run from a source checkout" in capsys.readouterr().err
