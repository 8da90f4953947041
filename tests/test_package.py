"""Packaging: kernels/ is reachable only as electra_triton.kernels, and the console script dispatches."""

import os
import pathlib
import subprocess
import sys

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, pathlib, sys
import electra_triton.kernels.rtd_loss
spec = importlib.util.find_spec("kernels")
print("ours" if spec and pathlib.Path(spec.origin).resolve().parent == pathlib.Path(sys.argv[1]) else "not ours")
"""


def test_kernels_are_a_subpackage_not_a_top_level_module(tmp_path):
    # Outside the checkout, as an installed package is used: Hugging Face's `kernels` may exist, ours must not.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPOSITORY / "kernels")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    if "No module named 'electra_triton'" in result.stderr:
        pytest.skip("electra_triton is not installed (running from a checkout through PYTHONPATH)")
    assert result.stdout.strip() == "not ours", result.stderr


def test_source_tree_maps_kernels_into_the_package(tmp_path):
    # Without installing (the offline GPU machine): PYTHONPATH=checkout gives the same import names.
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run([sys.executable, "-c", "import electra_triton.kernels.rtd_loss as m; print(m.__file__)"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(result.stdout.strip()).resolve() == REPOSITORY / "kernels" / "rtd_loss.py"


def test_console_script_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "electra_triton.cli"], capture_output=True, text=True)
    assert result.returncode == 2 and "check-compile" in result.stderr
    result = subprocess.run([sys.executable, "-m", "electra_triton.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0


def test_every_subpackage_is_shipped():
    # setuptools installs exactly the listed packages: a subpackage missing there works from the checkout only.
    import tomllib

    listed = set(tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPOSITORY).parts)
             for init in (REPOSITORY / "electra_triton").rglob("__init__.py")}
    found.add("electra_triton.kernels")
    assert found == listed
