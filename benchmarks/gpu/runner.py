"""The part registry, the budget, the worker phase, and DIR/evidence.json, evidence.md, evidence.log and the plots.

Each part is a function `Context -> list[dict]` (its results) in PARTS, with its cost estimate beside it: adding a part
is one line there. A part fails by raising (PartFailedError keeps its results) or by returning a row with `ok: False`.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from electra_triton.ops import get_kernel_mode, set_kernel_mode

from .. import plots, pretrain
from ..common import environment, markdown_table, write_json
from . import checks, targets, timed
from .context import Context

logger = logging.getLogger("benchmarks.gpu")


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context], list[dict]]
    estimate_s: float  # on an H100/H200 with cold compile caches, compilation included
    compile_s: float = 0.0  # of that, what a warm-up in a worker process takes off (Triton and inductor caches)
    toy_s: float = 10.0  # on a 2-core CPU at toy size (the interpreter for the checks)
    timed: bool = False  # measures time: runs alone in the main process, after the worker phase
    warm_lane: str | None = None  # warm-ups of one lane run one after another in one worker (device memory)
    wait_for_warm_up: bool = True  # False: the worker phase does not wait for it (the budget rarely reaches the part)

    @property
    def group(self) -> str:
        return self.name.split("/")[0]


# In order of value. Estimates: first guesses for an H100 (Triton compiles ~1-3 s per kernel variant, inductor a
# minute per training graph); calibrate them from `seconds` in the first evidence.json.
PARTS = [
    Part("correctness/attention", checks.op_correctness("attention"), 40, toy_s=15),
    Part("correctness/gelu_linear", checks.op_correctness("gelu_linear"), 25, toy_s=5),
    Part("correctness/dropout_add_layer_norm", checks.op_correctness("dropout_add_layer_norm"), 15, toy_s=5),
    Part("correctness/rtd_loss", checks.op_correctness("rtd_loss"), 10, toy_s=5),
    Part("correctness/mlm_loss", checks.op_correctness("mlm_loss"), 15, toy_s=5),
    Part("correctness/generator_head", checks.op_correctness("generator_head"), 15, toy_s=5),
    Part("correctness/patched-models", checks.patched_models, 45, toy_s=15),
    Part("correctness/torch-compile", checks.compiled_model, 90, toy_s=15),
    Part("kernels/attention", timed.headline_attention, 60, compile_s=30, toy_s=10, timed=True),
    Part("kernels/gelu_linear", timed.headline_gelu_linear, 50, compile_s=35, toy_s=5, timed=True),
    Part("kernels/layer_norm", timed.headline_layer_norm, 30, compile_s=20, toy_s=5, timed=True),
    Part("kernels/rtd_loss", timed.headline_rtd_loss, 12, compile_s=5, toy_s=5, timed=True),
    Part("kernels/attention-varlen", timed.headline_attention_varlen, 35, compile_s=10, toy_s=10, timed=True),
    Part("e2e/pretrain-hf-sdpa", timed.end_to_end("pretrain", ("hf-sdpa",)), 30, toy_s=10, timed=True),
    Part("e2e/pretrain-electra-triton", timed.end_to_end("pretrain", ("electra-triton",)), 45, compile_s=20,
         toy_s=10, timed=True, warm_lane="e2e"),
    Part("e2e/finetune", timed.end_to_end("finetune", ("hf-sdpa", "electra-triton")), 60, compile_s=25, toy_s=10,
         timed=True, warm_lane="e2e"),
    Part("e2e/torchrun-1gpu", timed.single_gpu_torchrun(fsdp=False), 45, compile_s=15, toy_s=30, timed=True,
         warm_lane="torchrun"),
    # The same kernels as the run before it: its compilation is warm once that one's warm-up or run has been.
    Part("e2e/torchrun-1gpu-fsdp", timed.single_gpu_torchrun(fsdp=True), 35, toy_s=30, timed=True),
    Part("e2e/pretrain-hf-sdpa-compile", timed.end_to_end("pretrain", ("hf-sdpa-compile",)), 150, compile_s=100,
         toy_s=15, timed=True, warm_lane="e2e-compile", wait_for_warm_up=False),
    Part("e2e/pretrain-electra-triton-compile", timed.end_to_end("pretrain", ("electra-triton-compile",)), 150,
         compile_s=100, toy_s=15, timed=True, warm_lane="e2e-compile", wait_for_warm_up=False),
    Part("projection/anatomy", timed.anatomy_projection, 60, toy_s=20),
]


def select(patterns: list[str] | None) -> list[Part]:
    """The parts named, or in a named group ("kernels"), in registry order; all when no pattern is given."""
    if not patterns:
        return list(PARTS)
    known = {p.name for p in PARTS} | {p.group for p in PARTS}
    unknown = [p for p in patterns if p not in known]
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {sorted(known)}")
    return [p for p in PARTS if p.name in patterns or p.group in patterns]


class BudgetExceeded(BaseException):
    """Raised in a running part at the deadline. A BaseException, so that the benchmarks' own `except Exception`
    (which records a failing backend and goes on) lets it through."""


@contextlib.contextmanager
def deadline_alarm(seconds: float) -> Iterator[None]:
    """Interrupt the main thread after `seconds` (a no-op outside the main thread or without SIGALRM)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise BudgetExceeded(f"stopped at the budget's deadline ({seconds:.0f} s into the part)")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(part: Part, ctx: Context) -> dict[str, Any]:
    """Run one part; never raises an Exception: a failure is recorded with its traceback in the log."""
    start = time.perf_counter()
    record: dict[str, Any] = {"name": part.name, "group": part.group, "status": "ok", "results": []}
    try:
        record["results"] = part.run(ctx)
        bad = [row for row in record["results"] if row.get("ok") is False]
        if bad:
            record["status"] = "failed"
            record["reason"] = f"{len(bad)} of {len(record['results'])} checks break the accuracy rule"
    except timed.PartFailedError as error:
        record.update(status="failed", reason=str(error), results=error.results)
    except Exception as error:
        record.update(status="failed", reason=f"{type(error).__name__}: {error}"[:1000])
        logger.error("%s failed:\n%s", part.name, traceback.format_exc())
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    record["seconds"] = time.perf_counter() - start
    return record


@contextlib.contextmanager
def kernel_mode_for(part: Part, device: torch.device) -> Iterator[str]:
    """The ops' kernel mode while a part runs: timed parts on CPU (TOY) time the references, as the kernel suite
    does (the interpreter's speed means nothing); everything else keeps the current mode."""
    previous = get_kernel_mode()
    mode = "reference" if part.timed and device.type == "cpu" else previous
    set_kernel_mode(mode)
    try:
        yield mode
    finally:
        set_kernel_mode(previous)


def _worker_task(names: list[str], settings: dict[str, Any], warm: bool) -> list[dict[str, Any]]:
    """In a worker process: run these parts in order (warm: to fill the compile caches, results dropped)."""
    logging.basicConfig(level=logging.INFO, format="[worker %(process)d] %(message)s")
    ctx = Context.from_settings(settings, warm)
    records = []
    for name in names:
        part = next(p for p in PARTS if p.name == name)
        with kernel_mode_for(part, ctx.device):
            record = run_part(part, ctx)
        if warm:
            record = {"name": name, "status": "warm" if record["status"] == "ok" else record["status"],
                      "seconds": record["seconds"], "reason": record.get("reason")}
        records.append(record)
    return records


def worker_tasks(parts: list[Part]) -> list[tuple[list[str], bool]]:
    """(part names, warm-up?) per worker task: each check alone; the warm-ups of the timed parts that compile, those
    of one lane together in order (one at a time on the device), the others alone."""
    tasks: list[tuple[list[str], bool]] = [([p.name], False) for p in parts if not p.timed]
    lanes: dict[str | None, list[str]] = {}
    for part in parts:
        if part.timed and part.compile_s > 0:
            lanes.setdefault(part.warm_lane, []).append(part.name)
    tasks += [(names, True) for lane, names in lanes.items() if lane is not None]
    return tasks + [([name], True) for name in lanes.get(None, [])]


def triton_cache_entries() -> tuple[str, int]:
    """Triton's on-disk compile cache and how many entries it holds (one folder per compiled kernel variant)."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    folder = pathlib.Path(knobs.cache.dir if knobs else os.environ.get(
        "TRITON_CACHE_DIR", pathlib.Path.home() / ".triton" / "cache"))
    return str(folder), sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


class Run:
    """One invocation: the budget, the records, and the files in --out."""

    def __init__(self, out: pathlib.Path, budget_s: float, ctx: Context, workers: int):
        self.out, self.budget_s, self.ctx, self.workers = out, budget_s, ctx, workers
        self.start = time.perf_counter()
        self.records: dict[str, dict[str, Any]] = {}
        self.warmed: set[str] = set()
        self.payload = {**environment(), "toy": ctx.toy, "budget_s": budget_s, "workers": workers,
                        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "kernel_mode": {}, "ceilings": None, "estimates": {}, "parts": []}
        folder, entries = triton_cache_entries()
        # Entries added during the run = kernel variants compiled here: with a carried cache, the misses.
        self.payload["triton_cache"] = {"dir": folder, "entries_at_start": entries, "entries_at_end": entries}

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def estimate(self, part: Part) -> float:
        if self.ctx.toy:
            return part.toy_s
        return part.estimate_s - (part.compile_s if part.name in self.warmed else 0.0)

    def record(self, part: Part, record: dict[str, Any], where: str) -> None:
        record.update(estimate_s=self.estimate(part), where=where)
        self.records[part.name] = record
        line = timed.summary(record["results"]) if record["status"] == "ok" and part.timed else ""
        logger.info("[%s] %s in %.1f s (estimate %.0f s)%s%s", record["status"], part.name, record.get("seconds", 0),
                    record["estimate_s"], f": {record['reason']}" if record.get("reason") else "",
                    f": {line}" if line else "")
        self.write()

    def skip(self, part: Part, reason: str) -> None:
        self.record(part, {"name": part.name, "group": part.group, "status": "skipped", "seconds": 0.0,
                           "reason": reason, "results": []}, "-")

    def fits(self, part: Part) -> bool:
        if self.estimate(part) <= self.remaining():
            return True
        self.skip(part, f"budget: needs ~{self.estimate(part):.0f} s, {max(self.remaining(), 0):.0f} s left")
        return False

    # ------------------------------------------------------------------------------------------------- phases
    def worker_phase(self, parts: list[Part], share: float) -> None:
        """Checks in parallel worker processes, beside warm-ups of the timed parts that compile. Ends when the checks
        and the warm-ups it waits for are done, or at `share` of the budget, whichever comes first; a warm-up still
        running then is stopped (it only leaves that part's compilation to the part itself)."""
        tasks = worker_tasks([p for p in parts if p.timed or self.fits(p)])
        if not tasks:
            return
        waited = {p.name for p in parts if not p.timed or p.wait_for_warm_up}
        logger.info("worker phase: %d tasks on %d workers, for at most %.0f s", len(tasks), self.workers,
                    share * self.budget_s)
        pool = multiprocessing.get_context("spawn").Pool(self.workers)
        pending = {pool.apply_async(_worker_task, (names, self.ctx.settings(), warm)): (names, warm)
                   for names, warm in tasks}
        stop_at = self.start + share * self.budget_s
        try:
            while any(set(names) & waited for names, _ in pending.values()) and time.perf_counter() < stop_at:
                for handle in [h for h in pending if h.ready()]:
                    names, warm = pending.pop(handle)
                    try:
                        records = handle.get()
                    except Exception as error:  # the task failed outside a part (a worker that cannot import)
                        records = [{"name": n, "status": "failed", "seconds": 0.0, "results": [],
                                    "reason": f"worker task: {type(error).__name__}: {error}"} for n in names]
                    for record in records:
                        self._from_worker(record, warm)
                time.sleep(0.2)
        finally:
            pool.terminate()
            pool.join()
        for names, warm in pending.values():
            logger.info("worker phase over: %s %s unfinished", "warm-up of" if warm else "check", ", ".join(names))
            if not warm:
                for name in names:
                    part = next(p for p in PARTS if p.name == name)
                    self.record(part, {"name": name, "group": part.group, "status": "failed", "seconds": 0.0,
                                       "results": [], "reason": "not finished within the worker phase"}, "worker")

    def _from_worker(self, record: dict[str, Any], warm: bool) -> None:
        part = next(p for p in PARTS if p.name == record["name"])
        if warm:
            if record["status"] == "warm":
                self.warmed.add(part.name)
            logger.info("[warm-up %s] %s in %.1f s%s", record["status"], part.name, record["seconds"],
                        f": {record['reason']}" if record.get("reason") else "")
            return
        self.record(part, record, "worker")

    def serial_phase(self, parts: list[Part]) -> None:
        for part in parts:
            if part.name in self.records or not self.fits(part):
                continue
            try:
                with kernel_mode_for(part, self.ctx.device) as mode:
                    self.payload["kernel_mode"][part.group] = mode
                    if part.timed and self.payload["ceilings"] is None:
                        self.payload["ceilings"] = self.ctx.bench.ceilings
                    with deadline_alarm(self.remaining()):
                        record = run_part(part, self.ctx)
            except BudgetExceeded as error:
                record = {"name": part.name, "group": part.group, "status": "failed", "results": [],
                          "reason": str(error), "seconds": self.estimate(part)}
            self.record(part, record, "main")

    # ------------------------------------------------------------------------------------------------- output
    def write(self) -> None:
        order = [p.name for p in PARTS]
        self.payload["parts"] = sorted(self.records.values(), key=lambda r: order.index(r["name"]))
        self.payload["seconds"] = time.perf_counter() - self.start
        self.payload["triton_cache"]["entries_at_end"] = triton_cache_entries()[1]
        projections = [row for r in self.payload["parts"] if r["group"] == "projection" for row in r["results"]]
        runs = [run for r in self.payload["parts"] if r["group"] == "e2e" for run in r["results"] if "backend" in run]
        timed.attach_projections(runs, projections, self.payload["device"])
        pretrain._ratios(runs)  # the targets' ratios across parts (each part runs benchmarks.pretrain on its own)
        write_json(self.out / "evidence.json", self.payload)
        (self.out / "evidence.md").write_text(render_markdown(self.payload))

    def plots(self) -> list[pathlib.Path]:
        rows = [row for r in self.payload["parts"] if r["group"] == "kernels" for row in r["results"]]
        runs = [run for r in self.payload["parts"] if r["group"] == "e2e" for run in r["results"] if "backend" in run]
        device, toy = self.payload["device"], self.payload["toy"]
        written = [plots.kernel_speedups(rows, self.out / "kernels_speedup.png", device, toy) if rows else None,
                   plots.pretrain_throughput(runs, self.out / "pretrain_throughput.png", device, toy) if runs else None]
        return [path for path in written if path]


# ----------------------------------------------------------------------------------------------------------- markdown

CHECK_COLUMNS = ("op", "case", "dtype", "tensor", "ok", "error", "plain_error", "bound")
KERNEL_COLUMNS = ("op", "impl", "case", "dtype", "pass", "ms", "tflops", "gbps", "fraction_of_ceiling", "speedup",
                  "vs", "note")
RUN_COLUMNS = ("task", "preset", "seq_len", "batch_size", "backend", "status", "tokens_per_s", "step_ms", "mfu",
               "peak_mem_gb", "speedup_vs_hf-sdpa", "mem_vs_hf-sdpa", "projected_step_ms", "measured_over_projected")


def render_markdown(payload: dict[str, Any]) -> str:
    parts = payload["parts"]
    lines = ["**TOY RUN ON CPU: sizes and timings are not results.**", ""] if payload["toy"] else []
    lines += [f"# GPU evidence: {payload['device']}", "",
              f"torch {payload['torch']}, triton {payload['triton']}, transformers {payload['transformers']}; commit "
              f"{payload['commit']}{' (dirty)' if payload.get('commit_dirty') else ''}; budget "
              f"{payload['budget_s']:.0f} s, {payload['seconds']:.0f} s used; ceilings {payload['ceilings']}.", "",
              "## Parts", "",
              markdown_table([{**r, "reason": r.get("reason")} for r in parts],
                             ("name", "status", "seconds", "estimate_s", "where", "reason")), ""]
    checked = [row for r in parts if r["group"] == "correctness" for row in r["results"]]
    if checked:
        failing = [row for row in checked if not row["ok"]]
        lines += ["## Correctness (2x rule against float64)", "",
                  f"{len(checked) - len(failing)} of {len(checked)} checks pass." +
                  (" Failing:" if failing else ""), ""]
        if failing:
            lines += [markdown_table(failing, CHECK_COLUMNS), ""]
    kernel_rows = [row for r in parts if r["group"] == "kernels" for row in r["results"]]
    if kernel_rows:
        lines += ["## Kernel headline cases", "", markdown_table(kernel_rows, KERNEL_COLUMNS), ""]
    runs = [run for r in parts if r["group"] == "e2e" for run in r["results"] if "backend" in run]
    if runs:
        lines += ["## End to end", "", markdown_table(runs, RUN_COLUMNS), ""]
    for r in parts:
        for result in r["results"]:
            if "exit_code" in result:
                lines += [f"- {r['name']}: `{result['command']}` exited {result['exit_code']} after "
                          f"{result['seconds']:.0f} s, {result['steps_logged']} logged steps, last metrics "
                          f"{result['last_metrics']}"]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description="GPU evidence in one command.")
    parser.add_argument("--out", type=pathlib.Path, help="results folder (created; at most 8 files); required")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no part that cannot end by then")
    parser.add_argument("--parts", nargs="+", metavar="PART", help="parts or groups to run (default: all); --list")
    parser.add_argument("--list", action="store_true", help="print the parts and their estimates, run nothing")
    parser.add_argument("--workers", type=int, help="worker processes for the checks and the compile warm-ups "
                        "(default: min(8, CPUs / 2) on CUDA, 0 = all in this process on CPU)")
    parser.add_argument("--worker-share", type=float, default=0.5, help="of the budget, at most, for the workers")
    parser.add_argument("--device", help="default: cuda when available, else cpu (TOY)")
    parser.add_argument("--notes", type=pathlib.Path, metavar="DIR", help="measure nothing: write DIR/NOTES.md (each "
                        "target, measured value, met or not) from DIR/evidence.json and print the README's rows")
    args = parser.parse_args(argv)
    if args.notes:
        evidence = json.loads((args.notes / "evidence.json").read_text())
        (args.notes / "NOTES.md").write_text(targets.notes_markdown(evidence))
        print(f"wrote {args.notes / 'NOTES.md'}; the README's results table rows:\n")
        print(targets.readme_rows(evidence, str(args.notes)))
        return 0
    if args.list:
        for part in PARTS:
            print(f"{part.name:45s} {part.estimate_s:5.0f} s (compile {part.compile_s:3.0f} s) toy {part.toy_s:.0f} s")
        return 0
    if args.out is None:
        parser.error("--out is required")
    parts = select(args.parts)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers if args.workers is not None else (
        min(8, (os.cpu_count() or 2) // 2) if device.type == "cuda" else 0)
    args.out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out / "evidence.log", mode="w")
    console = logging.StreamHandler()
    for h in (handler, console):
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    # `timeout` sends SIGTERM: end through the finally blocks, so that the worker processes are terminated too.
    previous_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="gpu-evidence-"))
    try:
        run = Run(args.out, args.budget_s, Context(device, device.type != "cuda", scratch), workers)
        run.payload["estimates"] = {p.name: {"estimate_s": p.estimate_s, "compile_s": p.compile_s, "toy_s": p.toy_s}
                                    for p in PARTS}
        logger.info("%s%s, budget %.0f s, %d workers, parts: %s", "TOY RUN ON CPU: " if run.ctx.toy else "",
                    run.payload["device"], args.budget_s, workers, ", ".join(p.name for p in parts))
        if workers > 0:
            run.worker_phase(parts, args.worker_share)
        run.serial_phase(parts)
        run.write()
        written = run.plots()
        logger.info("wrote %s", ", ".join(str(p) for p in [args.out / "evidence.json", args.out / "evidence.md",
                                                           args.out / "evidence.log", *written]))
        for record in run.payload["parts"]:  # the last lines of the output: what a truncated console shows
            logger.info("%-8s %-40s %6.1f s  %s", record["status"], record["name"], record["seconds"],
                        record.get("reason") or (timed.summary(record["results"]) if record["group"] in (
                            "kernels", "e2e") else ""))
        failed = [r["name"] for r in run.payload["parts"] if r["status"] == "failed"]
        logger.info("failed parts: %s", ", ".join(failed) or "none")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        shutil.rmtree(scratch, ignore_errors=True)
        for h in (handler, console):
            logger.removeHandler(h)
            h.close()
    return 1 if failed else 0
