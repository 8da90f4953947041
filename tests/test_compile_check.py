"""The ahead-of-time compile check: every registered kernel config compiles for sm_90a, without spills, within the
H100's shared memory, on HGMMA where it multiplies matrices. Runs in a subprocess because the compiler needs kernels
that were not decorated under TRITON_INTERPRET."""

import json
import os
import subprocess
import sys

import pytest

from electra_triton.compile_check import KERNEL_MODULES, problems

ROW_KEYS = {"kernel", "config", "arch", "ok", "registers", "spill_bytes", "shared_bytes", "mma", "error"}


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "electra_triton.cli", "check-compile", *args], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sm90_rows() -> list[dict]:
    result = run_check("--arch", "sm_90a", "--json")
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_kernel_config_compiles_for_sm90a_without_spills(sm90_rows):
    assert sm90_rows and all(row.keys() >= ROW_KEYS for row in sm90_rows)
    assert problems(sm90_rows) == []
    assert all(row["arch"] == "sm_90a" and row["registers"] > 0 for row in sm90_rows)


def test_every_kernel_module_is_covered(sm90_rows):
    compiled_sources = {row["kernel"] for row in sm90_rows}
    import importlib

    for name in KERNEL_MODULES:
        module = importlib.import_module(f"electra_triton.kernels.{name}")
        kernels = {attr for attr in dir(module) if attr.startswith("_") and attr.endswith("_kernel")}
        assert kernels <= compiled_sources, f"{name}: kernels never compiled by the check: {kernels - compiled_sources}"


def _row(**changes):
    row = {"kernel": "k", "config": "c", "arch": "sm_90a", "ok": True, "registers": 64, "spill_bytes": 0,
           "shared_bytes": 1024, "mma": "HGMMA", "error": None, "needs_mma": True}
    return {**row, **changes}


@pytest.mark.parametrize("changes, complaint", [
    ({"ok": False, "error": "boom"}, "does not compile"),
    ({"spill_bytes": 16}, "spills"),
    ({"shared_bytes": 300 * 1024}, "shared memory"),
    ({"mma": "HMMA"}, "not HGMMA"),
    ({"mma": None}, "not HGMMA"),
])
def test_problems_are_reported(changes, complaint):
    assert problems([_row()]) == []
    assert problems([_row(arch="sm_80", mma="HMMA")]) == []
    found = problems([_row(**changes)])
    assert len(found) == 1 and complaint in found[0]


def test_unknown_arch_is_refused():
    result = run_check("--arch", "sm_75")
    assert result.returncode != 0 and "invalid choice" in result.stderr
