"""The kernel suite: every kernel benchmark module, one run, one set of ceilings, one results folder.

    python -m benchmarks.kernels --out DIR                  # GPU: all ops, bf16 and fp16
    python -m benchmarks.kernels --out DIR --ops attention  # a subset
    python -m benchmarks.kernels --out DIR --toy            # toy sizes (the default on a machine without CUDA)

Writes DIR/kernels.json (environment, measured ceilings, every row), DIR/kernels.md (a table per op, our rows with
their speedup over the strongest alternative of the same case), DIR/kernels_attention.png (TFLOP/s over sequence
length per impl) and DIR/kernels_speedup.png (speedup per op, case and pass) when matplotlib is installed.

A module is `benchmarks/<name>.py` with `run(bench) -> list[dict]` (see benchmarks/rtd_loss.py). A module that does
not exist yet is skipped with a note; one that fails is recorded under "errors" and the suite goes on.
"""

import argparse
import importlib
import json
import pathlib
import sys
import time
import traceback

from electra_triton.ops import get_kernel_mode, set_kernel_mode
from electra_triton.ops._dispatch import KERNEL_MODES

from . import plots
from .common import Bench, add_speedups, environment, markdown_table, write_json

MODULES = ("attention", "gelu_linear", "layer_norm", "rtd_loss", "mlm_loss")

COLUMNS = ("impl", "case", "dtype", "pass", "ms", "tflops", "gbps", "fraction_of_ceiling", "peak_mem_gb", "speedup",
           "vs", "note")


def _load(name: str):
    """The module benchmarks.<name>, or None when it does not exist (any other import error propagates)."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}.{name}":
            return None
        raise


def run_suite(bench: Bench, ops: tuple[str, ...]) -> dict:
    rows: list[dict] = []
    skipped: list[dict] = []
    errors: list[dict] = []
    ran: list[dict] = []
    for name in ops:
        try:
            module = _load(name)
        except Exception as error:  # a module that landed but cannot import (its op not merged yet, say)
            errors.append({"op": name, "stage": "import", "error": f"{type(error).__name__}: {error}"})
            print(f"[kernels] {name}: import failed: {type(error).__name__}: {error}", flush=True)
            continue
        if module is None:
            skipped.append({"op": name, "reason": f"benchmarks/{name}.py does not exist yet"})
            print(f"[kernels] {name}: skipped (benchmarks/{name}.py does not exist yet)", flush=True)
            continue
        start = time.perf_counter()
        try:
            module_rows = module.run(bench)
        except Exception as error:
            errors.append({"op": name, "stage": "run", "error": f"{type(error).__name__}: {error}",
                           "traceback": traceback.format_exc(limit=8)})
            print(f"[kernels] {name}: FAILED: {type(error).__name__}: {error}", flush=True)
            continue
        rows += module_rows
        ran.append({"module": name, "rows": len(module_rows), "seconds": time.perf_counter() - start})
        print(f"[kernels] {name}: {len(module_rows)} rows in {time.perf_counter() - start:.1f} s", flush=True)
    return {"rows": add_speedups(rows), "modules": ran, "skipped": skipped, "errors": errors}


def render_markdown(payload: dict) -> str:
    lines = []
    if payload["toy"]:
        lines += ["**TOY RUN ON CPU: sizes and timings are not results.**", ""]
    ceilings, matmul_dtype = payload["ceilings"], "fp32" if payload["toy"] else "bf16"
    lines += [f"Device: {payload['device']}; torch {payload['torch']}, triton {payload['triton']}, "
              f"transformers {payload['transformers']}; commit {payload['commit']}.",
              f"Measured ceilings: {matmul_dtype} matmul {ceilings['matmul_tflops']:.1f} TFLOP/s, "
              f"device copy {ceilings['copy_gbps']:.0f} GB/s (read + write). `fraction_of_ceiling` is TFLOP/s over "
              "the matmul ceiling for compute-bound ops, GB/s over the copy ceiling for memory-bound ones; `speedup` "
              "is the fastest alternative's median time over ours in the same case, `vs` names that alternative.", ""]
    rows = payload["rows"]
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        columns = [c for c in COLUMNS if any(r.get(c) is not None for r in op_rows)]
        lines += [f"## {op}", "", markdown_table(op_rows, columns), ""]
    for item in payload["skipped"]:
        lines.append(f"- skipped {item['op']}: {item['reason']}")
    for item in payload["errors"]:
        lines.append(f"- **error** in {item['op']} ({item['stage']}): {item['error']}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="results folder (created)")
    parser.add_argument("--ops", nargs="+", choices=MODULES, default=list(MODULES), help="modules to run")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--toy", action="store_true", help="toy sizes (implied on CPU): a smoke test, not results")
    parser.add_argument("--rotations", type=int, default=3, help="input sets timed in rotation (L2 not reused)")
    parser.add_argument("--kernels", choices=KERNEL_MODES,
                        help="electra_triton kernel mode (default: auto; CPU: reference, the toy run being a smoke "
                        "test of the scripts; the kernels' own tests run them in the interpreter)")
    parser.add_argument("--merge", nargs="+", type=pathlib.Path, metavar="JSON",
                        help="measure nothing: combine these kernels.json files (one per GPU command) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        payload = merge_payloads([json.loads(path.read_text()) for path in args.merge], args.merge)
        return write_results(args.out, payload)

    bench = Bench(args.device, toy=True if args.toy else None, rotations=args.rotations)
    kernel_mode = args.kernels or ("reference" if bench.device.type == "cpu" else "auto")
    print(f"[kernels] {bench.device} toy={bench.toy} kernels={kernel_mode} ceilings: {bench.ceilings}", flush=True)
    previous_mode = get_kernel_mode()
    set_kernel_mode(kernel_mode)
    try:
        results = run_suite(bench, tuple(args.ops))
    finally:
        set_kernel_mode(previous_mode)
    payload = {**environment(), "toy": bench.toy, "kernels": kernel_mode, "ceilings": bench.ceilings, **results}
    return write_results(args.out, payload)


def merge_payloads(payloads: list[dict], sources: list[pathlib.Path]) -> dict:
    """One payload from several suite runs (e.g. `--ops attention` and the rest, in two GPU commands)."""
    rows = [row for payload in payloads for row in payload["rows"]]
    ran = {item["module"] for payload in payloads for item in payload.get("modules", [])}
    merged = {**payloads[0], "rows": add_speedups(rows),
              "modules": [item for payload in payloads for item in payload.get("modules", [])],
              "skipped": [item for payload in payloads for item in payload["skipped"] if item["op"] not in ran],
              "errors": [item for payload in payloads for item in payload["errors"]],
              "merged_from": [{"path": str(source), "device": payload["device"], "commit": payload["commit"],
                               "ceilings": payload["ceilings"]} for source, payload in zip(sources, payloads,
                                                                                          strict=True)]}
    merged["skipped"] = list({item["op"]: item for item in merged["skipped"]}.values())
    if len({(item["device"], item["commit"]) for item in merged["merged_from"]}) > 1:
        print("[kernels] warning: merging runs from different devices or commits", flush=True)
    return merged


def write_results(out: pathlib.Path, payload: dict) -> int:
    """kernels.json, kernels.md and the plots into `out`; exit code 1 when a module failed."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "kernels.json", payload)
    (out / "kernels.md").write_text(render_markdown(payload))
    written = [plots.attention_tflops(payload["rows"], out / "kernels_attention.png", payload["device"],
                                      payload["toy"]),
               plots.kernel_speedups(payload["rows"], out / "kernels_speedup.png", payload["device"], payload["toy"])]
    if not plots.available():
        print("[kernels] matplotlib not installed: no plots written", flush=True)
    files = [out / "kernels.json", out / "kernels.md", *(p for p in written if p)]
    print(f"[kernels] wrote {', '.join(map(str, files))}", flush=True)
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
