"""Parts (b) and (c): the kernel headline cases and the end-to-end steps, through the project's own benchmarks so that
their rows keep the schemas of `benchmarks.kernels` (rows) and `benchmarks.pretrain` (runs).

(b) attention at L=512 and 128, D=64, key mask + dropout 0.1, fwd/bwd/fwd+bwd against every SDPA backend and HF's
eager attention, and varlen on lengths U[32, 512] against the padded impls; gelu_linear on ELECTRA-base's FFN shapes
against eager, torch.compile and cuBLAS F.linear alone; dropout_add_layer_norm at H=768 and rtd_loss at H=768
against bandwidth (GB/s over the measured copy ceiling). bf16, the dtype the targets are stated in. TOY: each
module's toy sizes, fp32, on the PyTorch references.

(c) one production pre-training step at base/512 (16k tokens) per backend, the fine-tuning step, and issue 18's
single-GPU torchrun of `electra_triton.pretrain` with the kernels on.
"""

import copy
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import anatomy, attention, gelu_linear, layer_norm, pretrain, rtd_loss
from ..common import Bench, add_speedups
from .context import Context

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
HEADLINE_DTYPE = torch.bfloat16


def _bench(ctx: Context) -> Bench:
    """The run's harness restricted to the headline dtype (TOY: the harness's own, fp32 on CPU)."""
    bench = copy.copy(ctx.bench)
    if not ctx.toy:
        bench.dtypes = [HEADLINE_DTYPE]
    return bench


def headline_attention(ctx: Context) -> list[dict]:
    bench = _bench(ctx)
    seqlens = (32,) if ctx.toy else (128, 512)  # 512: the headline; 128: "no slower than SDPA" there
    rows = [row for dtype in bench.dtypes
            for row in attention.padded_cases(bench, dtype, seqlens=seqlens, variants=((True, attention.DROPOUT),))]
    return add_speedups(rows)


def headline_attention_varlen(ctx: Context) -> list[dict]:
    """~16k real tokens of lengths U[32, 512]: varlen against the padded impls on the batch padded to 512."""
    bench = _bench(ctx)
    return add_speedups([row for dtype in bench.dtypes for row in attention.varlen_case(bench, dtype)])


def headline_gelu_linear(ctx: Context) -> list[dict]:
    return add_speedups(gelu_linear.run(_bench(ctx), shapes=None if ctx.toy else [(768, 3072), (3072, 768)]))


def headline_layer_norm(ctx: Context) -> list[dict]:
    return add_speedups(layer_norm.run(_bench(ctx), sizes=None if ctx.toy else [768]))


def headline_rtd_loss(ctx: Context) -> list[dict]:
    return add_speedups(rtd_loss.run(_bench(ctx), shapes=None if ctx.toy else [(32, 512, 768)]))


# --------------------------------------------------------------------------------------------------------- end to end


def _pretrain_flags(ctx: Context, task: str) -> list[str]:
    if task == "finetune":  # no preset after --presets: the fine-tuning run only
        # TOY: lengths U[32, 40], padded as the GPU run's U[32, 512] batches are.
        sizes = ["--presets"] + (["--finetune-max-len", "40", "--finetune-batch-size", "2"] if ctx.toy else [])
    else:
        sizes = (["--presets", "tiny", "--seq-lens", "16", "--tokens-per-step", "32"] if ctx.toy
                 else ["--presets", "base", "--seq-lens", "512"]) + ["--no-finetune"]
    steps = ["--warmup", "1", "--steps", "1", "--rotations", "1"] if ctx.toy or ctx.warm else []
    return sizes + steps


def end_to_end(task: str, backends: tuple[str, ...]) -> Callable[[Context], list[dict]]:
    """The part timing `benchmarks.pretrain` for these backends: its `runs`, unchanged (a warm-up run: 2 steps)."""
    def part(ctx: Context) -> list[dict]:
        out = ctx.scratch / f"{task}-{'-'.join(backends)}{'-warm' if ctx.warm else ''}"
        code = pretrain.main(["--out", str(out), "--backends", *backends, *_pretrain_flags(ctx, task)])
        runs = json.loads((out / "pretrain.json").read_text())["runs"]
        failed = [f"{run['backend']}: {run['status']}: {run['reason']}" for run in runs if run["status"] != "ok"]
        if code or failed:
            raise PartFailedError(f"benchmarks.pretrain: {'; '.join(failed) or f'exit code {code}'}", runs)
        return runs
    return part


class PartFailedError(Exception):
    """A part that ran to its end but whose results say it failed; they are kept in the evidence."""

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message)
        self.results = results


# ------------------------------------------------------------------------------------------------------------ torchrun


def torchrun_flags(ctx: Context, out: pathlib.Path, fsdp: bool) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node 1 -m electra_triton.pretrain` on the tiny preset: 20 steps
    with the kernels on (a warm-up: 2 steps; TOY: 2 steps of a micro model on the references)."""
    flags = ["--max-steps", "2" if ctx.warm else "20", "--log-every", "1" if ctx.warm else "5", "--kernels", "auto",
             "--tokenizer-train-docs", "2000"]
    if ctx.toy:
        flags = ["--max-steps", "2", "--log-every", "1", "--kernels", "reference", "--tokenizer-train-docs", "300",
                 "--vocab-size", "300", "--batch-size", "2", "--max-seq-len", "32"]
        for role in ("disc", "gen"):
            flags += [f"--{role}-hidden-size", "32", f"--{role}-intermediate-size", "64",
                      f"--{role}-num-attention-heads", "1"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
            "electra_triton.pretrain", "--output-dir", str(out), *flags, *(["--fsdp"] if fsdp else [])]


def single_gpu_torchrun(fsdp: bool) -> Callable[[Context], list[dict]]:
    """Issue 18, item 5. Without --fsdp one process builds no process group; with it, FSDP2 over NCCL (gloo on CPU)
    runs the patched models. Results: exit code, seconds, the last metrics line, the output's tail."""
    def part(ctx: Context) -> list[dict]:
        name = f"torchrun{'-fsdp' if fsdp else ''}{'-warm' if ctx.warm else ''}"
        out, log = ctx.scratch / name, ctx.scratch / f"{name}.log"
        command = torchrun_flags(ctx, out, fsdp)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY),
                                                                           os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        with open(log, "w") as sink:
            # Its own session, so that a stop at the budget ends torchrun's worker too.
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ctx.scratch,
                                       start_new_session=True)
            try:
                code = process.wait()
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        metrics = out / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        train = [row for row in rows if row.get("split", "train") == "train"]
        evaluations = [row for row in rows if row.get("split") == "eval"]
        result = {"command": " ".join(command[1:]), "exit_code": code, "seconds": time.perf_counter() - start,
                  "steps_logged": len(train), "last_metrics": train[-1] if train else None,
                  "last_eval": evaluations[-1] if evaluations else None, "output_tail": log.read_text()[-3000:]}
        if code != 0:
            raise PartFailedError(f"torchrun exited with {code}", [result])
        return [result]
    return part


def summary(results: list[dict[str, Any]]) -> str:
    """One line on what a timed part measured, for the log and the markdown."""
    if results and "exit_code" in results[0]:
        last = results[0]["last_metrics"] or {}
        return f"exit {results[0]['exit_code']}, {results[0]['steps_logged']} logged steps, loss {last.get('loss')}"
    if results and "backend" in results[0]:
        return "; ".join(f"{r['task']} {r['backend']}: " + (f"{r['tokens_per_s']:.0f} tok/s" if r["status"] == "ok"
                                                              else r["status"]) for r in results)
    ours = [r for r in results if r.get("speedup")]
    return "; ".join(f"{r['case']} {r['pass']}: {r['speedup']:.2f}x vs {r['vs']}" for r in ours[:4])


# ---------------------------------------------------------------------------------------------------------- projection

PROJECTED_KEYS = ("task", "preset", "seq_len", "batch_size", "backend")


def anatomy_projection(ctx: Context) -> list[dict]:
    """Part (d): the step anatomy's PROJECTED step time for the sizes e2e/pretrain-* measure (traced on fake tensors:
    host work only, so it runs beside the checks)."""
    preset, seq_len, batch_size = ("tiny", 16, 2) if ctx.toy else ("base", 512, 32)
    payload = anatomy.run(preset, seq_len, batch_size, ("hf-sdpa", "electra-triton"))
    return [{"task": "pretrain", "preset": preset, "seq_len": seq_len, "batch_size": batch_size,
             "backend": run["backend"], "label": payload["label"], "projected_step_ms": run["projected_step_ms"],
             "projected_step_ms_h200": run["projected_step_ms_h200"], "host_syncs": run["host_syncs"],
             "device_ops": run["device_ops"],
             "projected_head_ms": (run.get("generator_head") or {}).get("projected_ms")} for run in payload["runs"]]


def attach_projections(runs: list[dict], projections: list[dict], device: str) -> None:
    """Give each measured run its projection (the device's: H200 or H100) and measured / projected, in place."""
    column = "projected_step_ms_h200" if "H200" in device.upper() else "projected_step_ms"
    for run in runs:
        match = next((p for p in projections if all(p[k] == run.get(k) for k in PROJECTED_KEYS)), None)
        if match is not None:
            run["projected_step_ms"] = match[column]
            run["measured_over_projected"] = (run["step_ms"] / match[column]
                                              if run.get("step_ms") and match[column] else None)
