"""Benchmark harness shared by every kernel benchmark (benchmarks/<op>.py) and the end-to-end benchmark.

Protocol (DESIGN.md): measure the device's own ceilings first (a large bf16 matmul; a device-to-device copy counting
bytes read + written), time with CUDA events through triton.testing.do_bench (median, warm-up excluded, L2 flushed
between runs) over several input sets used in rotation, and report each result as a fraction of those ceilings.

A kernel benchmark module exposes `run(bench: Bench) -> list[dict]`, building its rows with `bench.row(...)`. With
`bench.toy` (a CPU run) it uses toy sizes so that CI exercises the script; CPU numbers are never presented as results.
"""

import itertools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment() -> dict[str, Any]:
    """Device, library versions and git commit: stored with every result file."""
    import transformers
    import triton

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=pathlib.Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    # A copy of the tree without .git (as the offline GPU machine gets) names its commit through BENCH_COMMIT.
    commit = git("rev-parse", "HEAD") or os.environ.get("BENCH_COMMIT")
    # Tracked files changed since that commit: the numbers did not come from the commit alone.
    changes = git("status", "--porcelain", "--untracked-files=no")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'cpu'})"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "commit": commit,
            "commit_dirty": None if changes is None else bool(changes)}


class Bench:
    """Timing, ceilings and result rows for one benchmark run on one device."""

    def __init__(self, device: str | torch.device | None = None, toy: bool | None = None, rotations: int = 3):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.toy = self.device.type != "cuda" if toy is None else toy
        self.rotations = 1 if self.toy else rotations
        # bf16 needs the GPU: the interpreter's tl.dot on bf16 is wrong (triton-lang/triton#11584).
        self.dtypes = [torch.float32] if self.device.type == "cpu" else [torch.bfloat16, torch.float16]
        self.ceilings = self._measure_ceilings()

    def _measure_ceilings(self) -> dict[str, float]:
        n, dtype = (256, torch.float32) if self.toy else (8192, torch.bfloat16)
        a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
        matmul_ms = self.time_ms(lambda: a @ b)["median"]
        copy_elems = 2**20 if self.toy else 2**28  # 512 MiB of bf16 each way on GPU, far beyond L2
        src = torch.empty(copy_elems, device=self.device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_ms = self.time_ms(lambda: dst.copy_(src))["median"]
        return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbps": 2 * src.nbytes / copy_ms / 1e6}

    def time_ms(self, fn: Callable[..., Any], input_sets: Sequence[tuple] | None = None) -> dict[str, float]:
        """Median and 20/80 percentiles of fn(*inputs) in ms, cycling through `input_sets` call by call."""
        sets = itertools.cycle(input_sets or [()])
        call = lambda: fn(*next(sets))
        if self.device.type == "cuda":
            import triton.testing

            p20, median, p80 = triton.testing.do_bench(call, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
            return {"median": median, "p20": p20, "p80": p80}
        call()  # warm-up (and, under the interpreter, the first-call overhead)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return {"median": statistics.median(times), "p20": times[0], "p80": times[-1]}

    def peak_memory_gb(self, fn: Callable[[], Any]) -> float | None:
        """Peak device memory allocated while fn runs, above what was allocated before (None on CPU)."""
        if self.device.type != "cuda":
            return None
        _synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        _synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**30

    def row(self, *, op: str, impl: str, case: str, dtype: torch.dtype, pass_: str, timing: dict[str, float],
            flops: float | None = None, bytes_moved: float | None = None, **extra: Any) -> dict[str, Any]:
        """One result: time, and TFLOP/s or GB/s with their fraction of the measured ceiling when given."""
        ms = timing["median"]
        result = {"op": op, "impl": impl, "case": case, "dtype": str(dtype).removeprefix("torch."), "pass": pass_,
                  "ms": ms, "ms_p20": timing["p20"], "ms_p80": timing["p80"], "tflops": None, "gbps": None,
                  "fraction_of_ceiling": None, **extra}
        if flops is not None:
            result["tflops"] = flops / ms / 1e9
            result["fraction_of_ceiling"] = result["tflops"] / self.ceilings["matmul_tflops"]
        elif bytes_moved is not None:
            result["gbps"] = bytes_moved / ms / 1e6
            result["fraction_of_ceiling"] = result["gbps"] / self.ceilings["copy_gbps"]
        return result


def forward_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    """Run fn and backpropagate a ones-like gradient (any scalar or tensor output)."""
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))


OURS = "electra_triton"  # impl names starting with this are ours (e.g. "electra_triton-varlen"); others alternatives


def add_speedups(rows: list[dict]) -> list[dict]:
    """Give each of our rows `speedup` = best alternative's median / ours and `vs` = that alternative.

    Rows are compared within one (op, case, dtype, pass); rows without a time (an alternative that refused the case)
    are ignored. Returns the rows, updated in place.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("ms") is not None:
            groups.setdefault((row.get("op"), row.get("case"), row.get("dtype"), row.get("pass")), []).append(row)
    for group in groups.values():
        alternatives = [r for r in group if not str(r.get("impl")).startswith(OURS)]
        if not alternatives:
            continue
        best = min(alternatives, key=lambda r: r["ms"])
        for row in group:
            if str(row.get("impl")).startswith(OURS):
                row["speedup"], row["vs"] = best["ms"] / row["ms"], best["impl"]
    return rows


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def print_standalone(run: Callable[["Bench"], list[dict]], columns: Sequence[str]) -> None:
    """`python -m benchmarks.<op>`: measure the ceilings, run one op's benchmark, print its table."""
    bench = Bench()
    print(bench.ceilings)
    print(markdown_table(run(bench), columns))
