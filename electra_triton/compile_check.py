"""Ahead-of-time compile check: every kernel, at every configuration the package may launch for the ELECTRA presets,
compiled for a real GPU architecture on a machine without one.

    electra-triton check-compile --arch sm_90a [--json]
    python -m electra_triton.compile_check --arch sm_80

Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) runs from an ASTSource; the cubin is then read with the
cuobjdump shipped in the triton wheel. Per kernel and config it reports registers per thread, spill bytes (the stack
frame plus local memory of the kernel; ptxas puts spilled registers there, and our kernels have no local arrays),
shared memory, and which matrix instruction the SASS uses (HGMMA = Hopper wgmma, HMMA = mma.sync).
"""

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

from .presets import model_sizes

# Every module of electra_triton.kernels that launches kernels; each defines compile_targets(models, arch).
KERNEL_MODULES = ("rtd_loss", "mlm_loss", "attention", "gelu_linear", "layer_norm", "embeddings")
ARCHES = {"sm_90a": 90, "sm_80": 80}
H100_SHARED_MEMORY_PER_BLOCK = 227 * 1024

_targets: list = []  # filled before the worker processes fork, read by index in them


def collect_targets(arch: str, modules: tuple[str, ...] = KERNEL_MODULES) -> list:
    """The configurations the launchers pick on `arch` for every preset model."""
    targets = []
    for name in modules:
        targets += importlib.import_module(f"electra_triton.kernels.{name}").compile_targets(model_sizes(), arch)
    return targets


def _cuobjdump(*args: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout


def _compile(index: int, arch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = _targets[index]
    row = {
        "kernel": target.kernel.__name__, "config": target.label, "arch": arch, "ok": False, "registers": None,
        "spill_bytes": None, "shared_bytes": None, "mma": None, "error": None, "needs_mma": target.multiplies_matrices,
    }
    try:
        names = list(target.signature)
        attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in target.aligned}
        source = ASTSource(target.kernel, target.signature, constexprs=target.constexprs, attrs=attrs)
        options = {"num_warps": target.num_warps, "num_stages": target.num_stages, **target.options}
        compiled = triton.compile(source, target=GPUTarget("cuda", ARCHES[arch], 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = _cuobjdump("-res-usage", cubin.name)
            sass = _cuobjdump("-sass", cubin.name)
        resources = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
        row.update(
            ok=True,
            registers=int(resources["REG"]),
            spill_bytes=int(resources.get("STACK", 0)) + int(resources.get("LOCAL", 0)),
            shared_bytes=int(compiled.metadata.shared),
            mma="HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else None,
        )
    except Exception as error:  # a failed compile is a result to report, not a crash of the check
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    return row


def check_compile(
    arch: str = "sm_90a", modules: tuple[str, ...] = KERNEL_MODULES, jobs: int | None = None
) -> list[dict]:
    """Compile every registered kernel configuration for `arch`; one result dict per configuration."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {sorted(ARCHES)}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile check needs compiled kernels: run it with TRITON_INTERPRET unset")
    _targets[:] = collect_targets(arch, modules)
    jobs = jobs or min(len(_targets), os.cpu_count() or 1)
    if jobs <= 1:
        return [_compile(i, arch) for i in range(len(_targets))]
    # fork: the workers inherit the kernels and targets; nothing here has touched CUDA.
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, range(len(_targets)), [arch] * len(_targets)))


def problems(rows: list[dict]) -> list[str]:
    """What is wrong with a compile check's results: failures, spills, too much shared memory, missing HGMMA."""
    found = []
    for row in rows:
        name = f"{row['kernel']} [{row['config']}] on {row['arch']}"
        if not row["ok"]:
            found.append(f"{name}: does not compile: {row['error']}")
            continue
        if row["spill_bytes"]:
            found.append(f"{name}: spills {row['spill_bytes']} bytes")
        if row["shared_bytes"] > H100_SHARED_MEMORY_PER_BLOCK:
            found.append(f"{name}: {row['shared_bytes']} bytes of shared memory > {H100_SHARED_MEMORY_PER_BLOCK}")
        if row["needs_mma"] and row["arch"] == "sm_90a" and row["mma"] != "HGMMA":
            found.append(f"{name}: multiplies matrices with {row['mma']}, not HGMMA")
    return found


def _table(rows: list[dict]) -> str:
    lines = [f"{'kernel':32} {'config':52} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':>5}  status"]
    for row in rows:
        status = "ok" if row["ok"] else f"FAILED: {row['error']}"
        lines.append(
            f"{row['kernel']:32} {row['config']:52} {row['registers'] or '-':>4} {row['spill_bytes'] or 0:>5} "
            f"{row['shared_bytes'] or 0:>7} {row['mma'] or '-':>5}  {status}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="electra-triton check-compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default="sm_90a")
    parser.add_argument("--json", action="store_true", help="print the results as a JSON list")
    parser.add_argument("--kernels", nargs="*", default=list(KERNEL_MODULES), choices=KERNEL_MODULES,
                        help="kernel modules to check (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: all cores)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Triton decided at import whether kernels are interpreted; compile in a process that never was.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "electra_triton.compile_check", *argv], env=env).returncode
    rows = check_compile(args.arch, tuple(args.kernels), args.jobs)
    found = problems(rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows))
        print("\n".join(found) if found else f"{len(rows)} configurations: all compile, no spills, within limits")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
