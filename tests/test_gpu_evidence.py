"""`python -m benchmarks.gpu` at toy size on CPU (TOY): every part runs and writes the documented evidence; the budget
skips what cannot finish and stops what overruns; a failing part is recorded and the next one runs; the checks fail
when a kernel is wrong. No timing is asserted (DESIGN.md, Benchmarks)."""

import json
import pathlib
import sys
import time

import pytest
import torch

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:  # benchmarks/ is not installed; it runs from the checkout
    sys.path.insert(0, str(REPOSITORY))

from benchmarks.gpu import checks, runner, targets  # noqa: E402
from benchmarks.gpu.context import Context  # noqa: E402
from electra_triton import ops  # noqa: E402
from electra_triton.accuracy import accuracy  # noqa: E402

ENVIRONMENT_KEYS = {"device", "torch", "triton", "transformers", "commit", "toy", "parts"}
CHECK_KEYS = {"op", "case", "tensor", "ok", "error", "plain_error", "bound", "dtype"}
KERNEL_ROW_KEYS = {"op", "impl", "case", "dtype", "pass", "ms"}
RUN_KEYS = {"task", "preset", "seq_len", "batch_size", "backend", "status", "tokens_per_s", "step_ms", "mfu"}


def _evidence(out: pathlib.Path) -> dict:
    payload = json.loads((out / "evidence.json").read_text())
    assert payload.keys() >= ENVIRONMENT_KEYS and payload["toy"] is True
    assert (out / "evidence.md").read_text().startswith("**TOY RUN ON CPU")
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what the device tool brings back
    for part in payload["parts"]:
        assert part.keys() >= {"name", "status", "seconds", "results"} and part["status"] in ("ok", "failed",
                                                                                             "skipped")
    return payload


def _parts(payload: dict) -> dict[str, dict]:
    return {part["name"]: part for part in payload["parts"]}


def test_accuracy_rule_as_data():
    exact = torch.linspace(-3, 3, 101, dtype=torch.float64)
    plain = exact.half()
    assert accuracy(plain, plain, exact)["ok"]  # PyTorch's own error passes by construction
    worse = (exact + 0.05).half()
    verdict = accuracy(worse, plain, exact)
    assert not verdict["ok"] and verdict["error"] > verdict["bound"] >= 2 * verdict["plain_error"]
    assert not accuracy(torch.full_like(plain, float("nan")), plain, exact)["ok"]
    fp32 = exact.float()
    assert accuracy(fp32, fp32, exact)["ok"] and accuracy(fp32, fp32, exact)["plain_error"] is None
    assert not accuracy(fp32 * (1 + 1e-3), fp32, exact)["ok"]
    # An fp32 loss computed from fp16 inputs is held to the fp16 rule when told so.
    loss = torch.tensor(2.0 + 1e-3)
    assert not accuracy(loss, loss, torch.tensor(2.0, dtype=torch.float64))["ok"]
    assert accuracy(loss, loss, torch.tensor(2.0, dtype=torch.float64), dtype=torch.float16)["ok"]
    with pytest.raises(ValueError, match="shape"):
        accuracy(fp32[:3], fp32, exact)


CHECK_PARTS = ["correctness"]
STEP_PARTS = ["kernels", "e2e/pretrain-hf-sdpa", "e2e/pretrain-electra-triton", "e2e/finetune", "projection"]
SLOW_PARTS = ["e2e/torchrun-1gpu", "e2e/torchrun-1gpu-fsdp", "e2e/pretrain-hf-sdpa-compile",
              "e2e/pretrain-electra-triton-compile"]


def _run_toy(out: pathlib.Path, parts: list[str]) -> dict[str, dict]:
    """The command on these parts: every one ran and passed; the parts by name."""
    assert runner.main(["--out", str(out), "--parts", *parts]) == 0
    by_name = _parts(_evidence(out))
    assert set(by_name) == {p.name for p in runner.select(parts)}
    assert all(part["status"] == "ok" for part in by_name.values()), [p.get("reason") for p in by_name.values()]
    return by_name


def test_toy_run_of_the_checks(tmp_path):
    by_name = _run_toy(tmp_path, CHECK_PARTS)
    checked = [row for part in by_name.values() for row in part["results"]]
    assert all(row.keys() >= CHECK_KEYS and row["ok"] for row in checked)
    assert {row["op"] for row in checked} >= {"attention", "gelu_linear", "dropout_add_layer_norm", "rtd_loss",
                                              "mlm_loss", "generator_head"}
    cases = {row["case"] for row in checked if row["op"] == "attention"}
    assert any("dropout" in case for case in cases) and any("varlen" in case for case in cases)
    dtypes = {row["dtype"] for row in checked}  # the rule's dtype: fp32 for rtd_loss's fp32 loss, as in its tests
    assert "float16" in dtypes and "bfloat16" not in dtypes  # bf16 only on the GPU: the interpreter's dot is wrong
    models = [row for row in checked if row["op"].startswith(("Electra", "torch.compile"))]
    assert {row["tensor"] for row in models} >= {"loss", "logits (real tokens)"}
    assert any(row["tensor"].startswith("grads of") for row in models)
    assert "## Correctness" in (tmp_path / "evidence.md").read_text()


def test_toy_run_of_the_kernels_and_steps(tmp_path, capsys):
    by_name = _run_toy(tmp_path, STEP_PARTS)
    kernel_rows = [row for name, part in by_name.items() if name.startswith("kernels") for row in part["results"]]
    assert all(row.keys() >= KERNEL_ROW_KEYS for row in kernel_rows)
    assert {row["op"] for row in kernel_rows} == {"attention", "gelu_linear", "dropout_add_layer_norm", "rtd_loss"}
    assert any(row.get("speedup") for row in kernel_rows)
    runs = [run for name, part in by_name.items() if name.startswith("e2e") for run in part["results"]]
    assert all(run.keys() >= RUN_KEYS and run["status"] == "ok" for run in runs)
    assert {(run["task"], run["backend"]) for run in runs} == {
        (task, backend) for task in ("pretrain", "finetune") for backend in ("hf-sdpa", "electra-triton")}
    by_backend = {run["backend"]: run for run in runs if run["task"] == "pretrain"}
    ours, stock = by_backend["electra-triton"], by_backend["hf-sdpa"]  # measured by two parts, compared across them
    assert ours["speedup_vs_hf-sdpa"] == pytest.approx(ours["tokens_per_s"] / stock["tokens_per_s"])
    # The anatomy's projection beside each measured pre-training step.
    assert all(run["projected_step_ms"] > 0 and run["measured_over_projected"] > 0 for run in runs
               if run["task"] == "pretrain")
    payload = _evidence(tmp_path)
    assert payload["ceilings"]["matmul_tflops"] > 0
    cache = payload["triton_cache"]
    assert cache["dir"] and cache["entries_at_end"] >= cache["entries_at_start"] >= 0
    markdown = (tmp_path / "evidence.md").read_text()
    assert "## Kernel headline cases" in markdown and "## End to end" in markdown
    if runner.plots.available():
        assert (tmp_path / "kernels_speedup.png").stat().st_size > 0
        assert (tmp_path / "pretrain_throughput.png").stat().st_size > 0

    # NOTES.md and the README's rows come from the evidence: every target, its value read off the runs, met or not.
    assert runner.main(["--notes", str(tmp_path)]) == 0
    notes = (tmp_path / "NOTES.md").read_text()
    assert notes.startswith("**TOY RUN ON CPU") and all(target.text in notes for target in targets.TARGETS)
    verdict = next(v for v in targets.verdicts(payload) if v["target"].startswith("pre-training step base/512: tok"))
    assert verdict["measured"] == pytest.approx(ours["speedup_vs_hf-sdpa"]) and verdict["met"] is not None
    rows = capsys.readouterr().out
    assert rows.count("\n| ") >= len(targets.TARGETS) - 1 and "not measured" in rows  # e.g. the torchrun, not run


@pytest.mark.slow
def test_toy_run_of_torchrun_and_the_compiled_steps(tmp_path):
    by_name = _run_toy(tmp_path, SLOW_PARTS)
    for name in SLOW_PARTS[:2]:
        (result,) = by_name[name]["results"]
        assert result["exit_code"] == 0 and result["steps_logged"] == 2, result["output_tail"]
        assert result["last_metrics"]["split"] == "train" and "disc_auc" in result["last_eval"]
        assert ("--fsdp" in result["command"]) == name.endswith("fsdp")
    for name in SLOW_PARTS[2:]:
        (run,) = by_name[name]["results"]
        assert run["status"] == "ok" and run["backend"].endswith("-compile")


def test_every_part_is_covered_by_the_toy_tests():
    covered = {p.name for group in (CHECK_PARTS, STEP_PARTS, SLOW_PARTS) for p in runner.select(group)}
    assert covered == {p.name for p in runner.PARTS}
    with pytest.raises(ValueError, match="unknown"):
        runner.select(["nope"])


def test_budget_skips_a_part_that_cannot_finish_and_stops_one_that_overruns(tmp_path, monkeypatch):
    ran = []

    def quick(ctx):
        ran.append("quick")
        return [{"value": 1}]

    def hangs(ctx):
        time.sleep(30)
        return []

    monkeypatch.setattr(runner, "PARTS", [
        runner.Part("kernels/quick", quick, 1, toy_s=0.1, timed=True),
        runner.Part("kernels/too-big", quick, 1, toy_s=1000),
        runner.Part("kernels/hangs", hangs, 1, toy_s=0.1),
        runner.Part("kernels/after", quick, 1, toy_s=0.1)])
    start = time.perf_counter()
    assert runner.main(["--out", str(tmp_path), "--budget-s", "3"]) == 1
    assert time.perf_counter() - start < 15
    by_name = _parts(_evidence(tmp_path))
    assert by_name["kernels/quick"]["status"] == "ok" and by_name["kernels/quick"]["results"] == [{"value": 1}]
    assert by_name["kernels/too-big"]["status"] == "skipped" and "budget" in by_name["kernels/too-big"]["reason"]
    assert by_name["kernels/hangs"]["status"] == "failed" and "deadline" in by_name["kernels/hangs"]["reason"]
    assert by_name["kernels/after"]["status"] == "skipped"  # nothing left of the budget
    assert ran == ["quick"]


def test_a_failing_part_is_recorded_with_its_traceback_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("kernel launch failed")

    def partial(ctx):
        raise runner.timed.PartFailedError("one backend failed", [{"backend": "x", "status": "error"}])

    monkeypatch.setattr(runner, "PARTS", [
        runner.Part("kernels/broken", broken, 1, toy_s=0.1), runner.Part("kernels/partial", partial, 1, toy_s=0.1),
        runner.Part("kernels/next", lambda ctx: [{"ok": True}], 1, toy_s=0.1)])
    assert runner.main(["--out", str(tmp_path)]) == 1
    by_name = _parts(_evidence(tmp_path))
    assert by_name["kernels/broken"]["status"] == "failed" and "kernel launch failed" in by_name["kernels/broken"][
        "reason"]
    assert by_name["kernels/partial"]["results"] == [{"backend": "x", "status": "error"}]
    assert by_name["kernels/next"]["status"] == "ok"
    log = (tmp_path / "evidence.log").read_text()
    assert "Traceback" in log and "RuntimeError: kernel launch failed" in log


def test_a_wrong_kernel_fails_its_check(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "gelu_linear", lambda x, w, b: ops.gelu_linear_reference(x, w, b) * 1.01)
    assert runner.main(["--out", str(tmp_path), "--parts", "correctness/gelu_linear"]) == 1
    (part,) = [p for p in _evidence(tmp_path)["parts"] if p["name"] == "correctness/gelu_linear"]
    assert part["status"] == "failed" and "accuracy rule" in part["reason"]
    assert {row["tensor"] for row in part["results"] if not row["ok"]} >= {"y", "dx"}


def test_worker_phase_runs_checks_and_warm_ups_in_processes(tmp_path):
    parts = ["correctness/rtd_loss", "kernels/rtd_loss"]
    assert runner.main(["--out", str(tmp_path), "--parts", *parts, "--workers", "1"]) == 0
    by_name = _parts(_evidence(tmp_path))
    assert by_name["correctness/rtd_loss"]["where"] == "worker" and by_name["correctness/rtd_loss"]["results"]
    assert by_name["kernels/rtd_loss"]["where"] == "main" and by_name["kernels/rtd_loss"]["results"]
    assert "[warm-up warm] kernels/rtd_loss" in (tmp_path / "evidence.log").read_text()


def test_warm_bench_times_nothing_and_runs_once():
    calls = []
    bench = Context(torch.device("cpu"), True, pathlib.Path("."), warm=True).bench
    assert bench.time_ms(lambda x: calls.append(x), [(1,), (2,)])["median"] == 1.0
    assert calls == [1]


def test_evaluate_returns_value_and_gradients_of_every_leaf():
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    out, dx, dw = checks.evaluate(lambda a, b: a @ b.T, [x, w], torch.ones(3, 2), torch.float64)
    assert out.dtype == torch.float64 and torch.allclose(dx, w.double().sum(0).expand(3, 4))
    assert torch.allclose(dw, x.double().sum(0).expand(2, 4))


def test_readme_results_table_lists_every_target():
    readme = (REPOSITORY / "README.md").read_text()
    missing = [t.text for t in targets.TARGETS if f"| {t.issues} | {t.text} |" not in readme]
    assert not missing, f"README's results table lacks {missing}: paste `python -m benchmarks.gpu --notes` rows"


def test_worker_tasks_keep_each_lane_in_one_worker():
    tasks = runner.worker_tasks(runner.PARTS)
    checks_alone = [names for names, warm in tasks if not warm]
    assert all(len(names) == 1 for names in checks_alone)
    assert {names[0] for names in checks_alone} == {p.name for p in runner.PARTS if not p.timed}
    warm = [names for names, is_warm in tasks if is_warm]
    assert ["e2e/pretrain-electra-triton", "e2e/finetune"] in warm  # base/512 steps: one at a time on the device
    assert ["e2e/pretrain-hf-sdpa-compile", "e2e/pretrain-electra-triton-compile"] in warm
    assert all("e2e/pretrain-hf-sdpa" not in names for names in warm)  # nothing to compile: no warm-up
    assert not any(p.wait_for_warm_up for p in runner.PARTS if p.timed and p.name.endswith("-compile"))
