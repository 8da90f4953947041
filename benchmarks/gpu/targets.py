"""The speed targets of the open issues, read off an evidence.json: the skeleton of a results folder's NOTES.md and
the rows of the README's results table.

    python -m benchmarks.gpu --notes benchmarks/results/<yyyy-mm-dd>-<gpu>    # reads evidence.json there

Each target names the value it reads (which part, which row) and its bound; `met` is computed, never typed in. What
stays to be written by hand is the cause of each miss and what to try next: the skeleton marks those places.
"""

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

HEADLINE_DTYPE = "bfloat16"


def _rows(evidence: dict, group: str) -> list[dict]:
    return [row for part in evidence["parts"] if part["group"] == group and part["status"] != "skipped"
            for row in part["results"]]


def _kernel(evidence: dict, op: str, impl: str, pass_: str, case: str = "") -> list[dict]:
    return [row for row in _rows(evidence, "kernels") if row.get("op") == op and row.get("impl") == impl
            and row.get("pass") == pass_ and case in str(row.get("case")) and row.get("ms") is not None
            and row.get("dtype") in (HEADLINE_DTYPE, "float32")]  # float32: a TOY run


def _worst(values: list[float], worst: Callable[[list[float]], float]) -> float | None:
    return worst(values) if values else None


def _ratio_to_best(evidence: dict, op: str, ours: str, others: Callable[[str], bool], pass_: str, case: str = ""
                   ) -> float | None:
    """Best alternative's time / ours, per case; the worst case's."""
    ratios = []
    for row in _kernel(evidence, op, ours, pass_, case):
        alternatives = [r["ms"] for r in _rows(evidence, "kernels") if r.get("op") == op and others(str(r["impl"]))
                        and r.get("pass") == pass_ and r.get("case") == row["case"] and r.get("dtype") == row["dtype"]
                        and r.get("ms") is not None]
        if alternatives:
            ratios.append(min(alternatives) / row["ms"])
    return _worst(ratios, min)


def _field(evidence: dict, op: str, impl: str, pass_: str, key: str, case: str = "",
           worst: Callable[[list[float]], float] = min) -> float | None:
    return _worst([row[key] for row in _kernel(evidence, op, impl, pass_, case) if row.get(key) is not None], worst)


def _run(evidence: dict, task: str, backend: str, key: str) -> float | None:
    runs = [run for run in _rows(evidence, "e2e") if run.get("task") == task and run.get("backend") == backend
            and run.get("status") == "ok"]
    return runs[0].get(key) if runs else None


def _projected_head_ratio(evidence: dict) -> float | None:
    heads = {row["backend"]: row.get("projected_head_ms") for row in _rows(evidence, "projection")}
    if heads.get("electra-triton") and heads.get("hf-sdpa"):
        return heads["electra-triton"] / heads["hf-sdpa"]
    return None


def _torchrun_exit(evidence: dict) -> float | None:
    codes = [row["exit_code"] for row in _rows(evidence, "e2e") if "exit_code" in row]
    return float(max(codes)) if codes else None


def _varlen_speedup(evidence: dict) -> float | None:
    """The padded kernel's time / the varlen kernel's on the same varlen batch (fwd+bwd, no dropout)."""
    ratios = []
    for varlen in _kernel(evidence, "attention", "electra_triton-varlen", "fwd+bwd"):
        padded = [r["ms"] for r in _kernel(evidence, "attention", "electra_triton", "fwd+bwd")
                  if r["case"] == varlen["case"] and r["dtype"] == varlen["dtype"]]
        if padded:
            ratios.append(padded[0] / varlen["ms"])
    return _worst(ratios, min)


is_sdpa = lambda impl: impl.startswith("sdpa")
is_alternative = lambda impl: not impl.startswith("electra_triton")


@dataclasses.dataclass(frozen=True)
class Target:
    issues: str
    text: str
    read: Callable[[dict], float | None]  # the measured value, or None when the evidence does not hold it
    compare: Callable[[float, float], bool]
    bound: float
    unit: str = ""

    def verdict(self, evidence: dict) -> dict[str, Any]:
        value = self.read(evidence)
        met = None if value is None else bool(self.compare(value, self.bound))
        return {"issues": self.issues, "target": self.text, "measured": value, "unit": self.unit, "met": met}


GE, LE = operator.ge, operator.le
TARGETS = [
    Target("2", "rtd_loss fwd+bwd, B·L=16384, H=768: fraction of the measured copy bandwidth ≥ 0.8",
           lambda e: _field(e, "rtd_loss", "electra_triton", "fwd+bwd", "fraction_of_ceiling", "H=768"), GE, 0.8),
    Target("2", "rtd_loss fwd+bwd: speedup over the HF path ≥ 3",
           lambda e: _ratio_to_best(e, "rtd_loss", "electra_triton", is_alternative, "fwd+bwd"), GE, 3.0, "x"),
    Target("3", "attention L=512, D=64, mask + dropout 0.1, fwd+bwd: TFLOP/s ≥ 290",
           lambda e: _field(e, "attention", "electra_triton", "fwd+bwd", "tflops", "L=512 mask dropout"), GE, 290.0,
           "TFLOP/s"),
    Target("3", "attention, same case: speedup over the fastest SDPA backend ≥ 1.5",
           lambda e: _ratio_to_best(e, "attention", "electra_triton", is_sdpa, "fwd+bwd", "L=512 mask dropout"),
           GE, 1.5, "x"),
    Target("3", "attention L=128, mask + dropout 0.1, fwd+bwd: speedup over the fastest SDPA backend ≥ 1.0",
           lambda e: _ratio_to_best(e, "attention", "electra_triton", is_sdpa, "fwd+bwd", "L=128 mask dropout"),
           GE, 1.0, "x"),
    Target("3", "varlen attention, lengths U[32, 512] (about half padding): padded kernel's time / varlen's ≥ 1.7",
           _varlen_speedup, GE, 1.7, "x"),
    Target("4", "gelu_linear fwd on the FFN shapes: time / cuBLAS F.linear alone ≤ 1.05",
           lambda e: (lambda r: None if r is None else 1 / r)(
               _ratio_to_best(e, "gelu_linear", "electra_triton", lambda i: i == "cublas_linear", "fwd")), LE, 1.05,
           "x"),
    Target("4", "gelu_linear fwd+bwd: speedup over eager ≥ 1.2",
           lambda e: _ratio_to_best(e, "gelu_linear", "electra_triton", lambda i: i == "eager", "fwd+bwd"), GE, 1.2,
           "x"),
    Target("4", "gelu_linear fwd+bwd: speedup over torch.compile ≥ 1.0",
           lambda e: _ratio_to_best(e, "gelu_linear", "electra_triton", lambda i: i == "torch.compile", "fwd+bwd"),
           GE, 1.0, "x"),
    Target("4", "dropout_add_layer_norm fwd+bwd, H=768: fraction of the measured copy bandwidth ≥ 0.8",
           lambda e: _field(e, "dropout_add_layer_norm", "electra_triton", "fwd+bwd", "fraction_of_ceiling"), GE, 0.8),
    Target("4", "dropout_add_layer_norm fwd+bwd: speedup over eager ≥ 2",
           lambda e: _ratio_to_best(e, "dropout_add_layer_norm", "electra_triton", lambda i: i == "eager", "fwd+bwd"),
           GE, 2.0, "x"),
    Target("5, 12", "fine-tuning step, base, batch 32, lengths U[32, 512]: tokens/s over hf-sdpa ≥ 2",
           lambda e: _run(e, "finetune", "electra-triton", "speedup_vs_hf-sdpa"), GE, 2.0, "x"),
    Target("7, 12, 13", "pre-training step base/512: tokens/s over hf-sdpa ≥ 1.8",
           lambda e: _run(e, "pretrain", "electra-triton", "speedup_vs_hf-sdpa"), GE, 1.8, "x"),
    Target("7, 13", "pre-training step base/512: tokens/s over hf-sdpa-compile ≥ 1.3 (electra-triton-compile's)",
           lambda e: _run(e, "pretrain", "electra-triton-compile", "speedup_vs_hf-sdpa-compile"), GE, 1.3, "x"),
    Target("7, 13", "pre-training step base/512: MFU against the measured matmul ceiling ≥ 0.5",
           lambda e: _run(e, "pretrain", "electra-triton", "mfu"), GE, 0.5),
    Target("7", "pre-training step base/512: peak memory / hf-sdpa's ≤ 0.6",
           lambda e: _run(e, "pretrain", "electra-triton", "mem_vs_hf-sdpa"), LE, 0.6, "x"),
    Target("13", "generator head: fused / stock time ≤ 0.5 (PROJECTED by the anatomy, not measured)",
           _projected_head_ratio, LE, 0.5, "x"),
    Target("17", "this command: seconds, Triton compilation included, ≤ 480 on an H100",
           lambda e: e.get("seconds"), LE, 480.0, "s"),
    Target("18", "single-GPU torchrun of the pre-training command, kernels on: exit code 0 (plain and --fsdp)",
           _torchrun_exit, LE, 0.0),
]


def verdicts(evidence: dict) -> list[dict[str, Any]]:
    return [target.verdict(evidence) for target in TARGETS]


def _value(verdict: dict) -> str:
    if verdict["measured"] is None:
        return "not measured"
    return f"{verdict['measured']:.3g}{' ' + verdict['unit'] if verdict['unit'] else ''}"


def notes_markdown(evidence: dict) -> str:
    """NOTES.md's skeleton: every target with its measured value and verdict; the causes are left to write."""
    device = evidence["device"]
    lines = ["**TOY RUN ON CPU: not results; these notes only show the format.**", ""] if evidence["toy"] else []
    lines += [f"# GPU evidence on {device}", "",
              f"Commit {evidence['commit']}{' (dirty)' if evidence.get('commit_dirty') else ''}; torch "
              f"{evidence['torch']}, triton {evidence['triton']}, transformers {evidence['transformers']}; "
              f"ceilings {evidence.get('ceilings')}; `python -m benchmarks.gpu` took {evidence['seconds']:.0f} s of "
              f"a {evidence['budget_s']:.0f} s budget.", "", "## Targets", "",
              "| issues | target | measured | met | cause of a miss, next step |", "|---|---|---|---|---|"]
    for verdict in verdicts(evidence):
        met = {True: "yes", False: "**no**", None: "—"}[verdict["met"]]
        todo = "TODO" if verdict["met"] is False else ""
        lines.append(f"| {verdict['issues']} | {verdict['target']} | {_value(verdict)} | {met} | {todo} |")
    lines += ["", "## Parts that failed or were skipped", ""]
    lines += [f"- {part['name']}: {part['status']}: {part.get('reason')}" for part in evidence["parts"]
              if part["status"] != "ok"] or ["- none"]
    lines += ["", "## Time per part against its estimate (calibrate `PARTS` in benchmarks/gpu/runner.py)", "",
              "| part | seconds | estimate_s | where |", "|---|---|---|---|"]
    lines += [f"| {part['name']} | {part['seconds']:.1f} | {part.get('estimate_s', '')} | {part.get('where', '')} |"
              for part in evidence["parts"]]
    return "\n".join(lines) + "\n"


def readme_rows(evidence: dict, folder: str) -> str:
    """The README results table's rows for this run (replace the "not measured" rows with these)."""
    rows = []
    for verdict in verdicts(evidence):
        measured = _value(verdict)
        if verdict["met"] is not None:
            measured += f", {'met' if verdict['met'] else 'missed'} on {evidence['device']} ([results]({folder}))"
        rows.append(f"| {verdict['issues']} | {verdict['target']} | {measured} |")
    return "\n".join(rows) + "\n"
