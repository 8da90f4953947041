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
import pathlib
import sys
import time
import traceback

from . import plots
from .common import Bench, add_speedups, environment, markdown_table, write_json

MODULES = ("attention", "gelu_linear", "layer_norm", "rtd_loss", "mlm_loss")

COLUMNS = ("impl", "case", "dtype", "pass", "ms", "tflops", "gbps", "fraction_of_ceiling", "peak_mem_gb", "speedup",
           "vs")


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
        print(f"[kernels] {name}: {len(module_rows)} rows in {time.perf_counter() - start:.1f} s", flush=True)
    return {"rows": add_speedups(rows), "skipped": skipped, "errors": errors}


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
    args = parser.parse_args(argv)

    bench = Bench(args.device, toy=True if args.toy else None, rotations=args.rotations)
    print(f"[kernels] {bench.device} toy={bench.toy} ceilings: {bench.ceilings}", flush=True)
    payload = {**environment(), "toy": bench.toy, "ceilings": bench.ceilings, **run_suite(bench, tuple(args.ops))}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "kernels.json", payload)
    (args.out / "kernels.md").write_text(render_markdown(payload))
    written = [plots.attention_tflops(payload["rows"], args.out / "kernels_attention.png", payload["device"],
                                      bench.toy),
               plots.kernel_speedups(payload["rows"], args.out / "kernels_speedup.png", payload["device"], bench.toy)]
    if not plots.available():
        print("[kernels] matplotlib not installed: no plots written", flush=True)
    files = [args.out / "kernels.json", args.out / "kernels.md", *(p for p in written if p)]
    print(f"[kernels] wrote {', '.join(map(str, files))}", flush=True)
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
