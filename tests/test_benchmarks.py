"""The benchmark entry points run end to end at toy size on CPU and write the documented files and JSON schema.

No timing is asserted: CPU numbers are not results (DESIGN.md, Benchmarks).
"""

import json
import pathlib
import sys

import pytest
import torch

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:  # benchmarks/ is not installed; it runs from the checkout
    sys.path.insert(0, str(REPOSITORY))

from benchmarks import common, kernels, plots, pretrain  # noqa: E402
from electra_triton.pretrain.config import PretrainConfig  # noqa: E402
from electra_triton.pretrain.step import TrainStep  # noqa: E402

ENVIRONMENT_KEYS = {"device", "torch", "triton", "transformers", "commit"}
RUN_KEYS = {"preset", "seq_len", "batch_size", "backend", "tokens_per_s", "step_ms", "mfu", "peak_mem_gb", "status",
            "reason", "step_ms_p20", "step_ms_p80", "task"}


def test_kernel_suite_writes_json_markdown_and_plots(tmp_path):
    assert kernels.main(["--out", str(tmp_path), "--toy"]) == 0
    payload = json.loads((tmp_path / "kernels.json").read_text())
    assert payload.keys() >= ENVIRONMENT_KEYS
    assert payload["toy"] is True
    assert payload["ceilings"]["matmul_tflops"] > 0 and payload["ceilings"]["copy_gbps"] > 0
    assert payload["errors"] == []
    ran = {item["module"] for item in payload["modules"]}
    assert "rtd_loss" in ran and any(row["op"] == "rtd_loss" for row in payload["rows"])
    assert ran | {item["op"] for item in payload["skipped"]} == set(kernels.MODULES)
    for row in payload["rows"]:
        assert row.keys() >= {"op", "impl", "case", "dtype", "pass", "ms"}
        if row["ms"] is not None:  # None: an alternative that refused the case, with a note saying so
            assert row["ms"] > 0 and "fraction_of_ceiling" in row
    assert any(row.get("speedup") for row in payload["rows"] if row["impl"].startswith(common.OURS))
    assert (tmp_path / "kernels.md").read_text().startswith("**TOY RUN ON CPU")
    if plots.available():
        assert (tmp_path / "kernels_speedup.png").stat().st_size > 0

    # Results of several GPU commands combine into one folder.
    assert kernels.main(["--out", str(tmp_path / "merged"), "--merge", *[str(tmp_path / "kernels.json")] * 2]) == 0
    merged = json.loads((tmp_path / "merged" / "kernels.json").read_text())
    assert len(merged["rows"]) == 2 * len(payload["rows"]) and len(merged["merged_from"]) == 2


def test_kernel_suite_skips_missing_modules(capsys):
    result = kernels.run_suite(object(), ("no_such_op",))  # never reaches the bench: the module does not exist
    assert result["rows"] == [] and result["skipped"][0]["op"] == "no_such_op"
    assert "no_such_op: skipped" in capsys.readouterr().out


def test_speedup_is_against_the_fastest_alternative():
    rows = [{"op": "x", "case": "c", "dtype": "bf16", "pass": "fwd", "impl": impl, "ms": ms}
            for impl, ms in (("electra_triton", 1.0), ("eager", 4.0), ("compiled", 2.0), ("refused", None))]
    common.add_speedups(rows)
    assert rows[0]["speedup"] == 2.0 and rows[0]["vs"] == "compiled"
    assert "speedup" not in rows[1]


def test_pretrain_writes_the_documented_schema(tmp_path):
    args = ["--out", str(tmp_path), "--toy", "--seq-lens", "16", "--backends", "hf-eager", "electra-triton",
            "--finetune-max-len", "24", "--finetune-batch-size", "2", "--warmup", "1", "--steps", "2", "--rotations",
            "1", "--tokenizer-docs", "100"]
    assert pretrain.main(args) == 0
    payload = json.loads((tmp_path / "pretrain.json").read_text())
    assert ENVIRONMENT_KEYS | {"matmul_tflops", "copy_gbps", "runs"} <= payload.keys()
    assert payload["toy"] is True
    runs = payload["runs"]
    assert [(r["task"], r["backend"]) for r in runs] == [
        (task, backend) for task in ("pretrain", "finetune") for backend in ("hf-eager", "electra-triton")]
    for run in runs:
        assert run.keys() >= RUN_KEYS
        if run["backend"].startswith("hf"):
            assert run["status"] == "ok", run
            assert run["tokens_per_s"] > 0 and run["step_ms"] > 0 and run["mfu"] > 0
            assert run["step_ms_p20"] <= run["step_ms"] <= run["step_ms_p80"]
        elif run["status"] == "skipped":  # never faked: skipped only while the patch does not exist
            assert "electra_triton.patch" in run["reason"]
        else:
            assert run["status"] == "ok", run
    pretrain_run = runs[0]
    assert pretrain_run["data"] == "pipeline" and payload["settings"]["pretrain_data"] == "pipeline"
    assert runs[2]["data"] == "synthetic"  # fine-tuning batches are a padding collator's shape
    assert pretrain_run["seq_len"] == 16 and pretrain_run["batch_size"] == 64 // 16
    assert pretrain_run["tokens_per_step"] == 64
    assert (tmp_path / "pretrain.md").read_text().startswith("**TOY RUN ON CPU")
    if plots.available():
        assert (tmp_path / "pretrain_throughput.png").stat().st_size > 0

    assert pretrain.main(["--out", str(tmp_path / "merged"), "--merge", *[str(tmp_path / "pretrain.json")] * 2]) == 0
    merged = json.loads((tmp_path / "merged" / "pretrain.json").read_text())
    assert len(merged["runs"]) == 2 * len(runs) and merged["device"] == payload["device"]


def test_compiled_backend_runs():
    # Dynamo tracing only (backend "eager", as toy CPU runs do); one batch shape, so one compilation.
    settings = {"device": torch.device("cpu"), "seed": 0, "rotations": 1, "warmup": 1, "steps": 1, "min_len": 8,
                "autocast": False, "matmul_tflops": 1.0, "compile_backend": "eager"}
    run = pretrain.run_one("finetune", "tiny", 16, 2, "hf-sdpa-compile", settings)
    assert run["status"] == "ok", run
    assert run["tokens_per_s"] > 0


def test_pretrain_records_oom_and_errors_and_goes_on(monkeypatch):
    def fail(preset, attn, seq_len, *specials, **options):
        if attn == "eager":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("compile failed")

    monkeypatch.setattr(pretrain, "build_pretrainer", fail)
    settings = {"device": torch.device("cpu"), "seed": 0, "data": pretrain.PretrainData()}
    oom = pretrain.run_one("pretrain", "tiny", 16, 2, "hf-eager", settings)
    error = pretrain.run_one("pretrain", "tiny", 16, 2, "hf-sdpa", settings)
    assert oom["status"] == "oom" and "out of memory" in oom["reason"]
    assert error["status"] == "error" and "compile failed" in error["reason"] and error["tokens_per_s"] is None


def test_pretrain_times_the_production_step_on_pipeline_or_labelled_synthetic_batches(monkeypatch):
    timed = []
    monkeypatch.setattr(pretrain, "time_steps", lambda step, batches, *a: (timed.append((step, batches)), (
        {"median": 1.0, "p20": 1.0, "p80": 1.0, "min": 1.0, "max": 1.0}, None))[1])
    sources = pretrain.resolve_corpus(["stdlib"])[:20]
    data = pretrain.PretrainData(sources, pretrain.train_tokenizer(sources, 300, 50, 64))
    settings = {"device": torch.device("cpu"), "seed": 0, "rotations": 2, "warmup": 0, "steps": 0,
                "matmul_tflops": 1.0, "compile_backend": "eager", "data": data}
    run = pretrain.run_one("pretrain", "tiny", 32, 2, "hf-sdpa", settings)
    assert run["status"] == "ok" and run["data"] == "pipeline", run
    step, batches = timed[-1]
    assert isinstance(step, TrainStep) and step.optimizer.defaults["foreach"]  # CPU: what the command uses here
    assert step.max_grad_norm == PretrainConfig.max_grad_norm and step.scheduler is not None
    expected = pretrain.pipeline_batches(sources, data.tokenizer, 2, 32, 2, 0)
    assert all(b["input_ids"].equal(e["input_ids"]) for b, e in zip(batches, expected, strict=True))
    step(batches[:1])  # the step the benchmark would time is the production one: it trains
    assert step.read_metrics()["micro_steps"] == 1
    assert 0 < run["fill"] <= 1
    synthetic = pretrain.run_one("pretrain", "tiny", 32, 2, "hf-sdpa", {**settings, "data": pretrain.PretrainData()})
    assert synthetic["data"] == "synthetic" and bool(timed[-1][1][0]["attention_mask"].all())
    packed_data = pretrain.PretrainData(sources, data.tokenizer, packing=True)
    packed = pretrain.run_one("pretrain", "tiny", 32, 2, "hf-sdpa", {**settings, "data": packed_data})
    assert packed["data"] == "pipeline, packed" and "position_ids" in timed[-1][1][0]  # passed through to the model
    assert packed["fill"] > run["fill"]


def test_finetune_flops_count_real_tokens_only():
    config = pretrain._config({**pretrain.PRESETS["tiny"]["discriminator"], "num_labels": 2}, "sdpa")
    assert pretrain.finetune_flops(config, [10, 10]) == pytest.approx(2 * pretrain.finetune_flops(config, [10]))
    assert pretrain.finetune_flops(config, [20]) > 2 * pretrain.finetune_flops(config, [10])  # attention is L^2
