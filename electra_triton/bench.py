"""`electra-triton bench SUITE [options]`: the benchmarks of a source checkout (`python -m benchmarks.SUITE`).

The benchmarks are not part of the installed package (they write results next to the code that produced them and
need its git commit), so this command finds the checkout the package runs from (an editable install, or PYTHONPATH
at the repository root) or the current folder, and runs the suite's main() there. Without a checkout it says where
to get one.
"""

import importlib
import pathlib
import sys

# Suites in the order the design lists them; a checkout may not have all of them yet.
SUITES = ("kernels", "pretrain", "data", "anatomy", "gpu")
_WHERE = ("the benchmarks run from a source checkout of electra-triton, not from an installed package: clone the "
          "repository, then from its root run `python -m benchmarks.kernels --out results/` (or `electra-triton "
          "bench kernels --out results/` there)")


def find_checkout() -> pathlib.Path | None:
    """The repository root holding benchmarks/: the package's parent folder, else the current folder."""
    for root in (pathlib.Path(__file__).resolve().parent.parent, pathlib.Path.cwd()):
        if (root / "benchmarks" / "__init__.py").is_file():
            return root
    return None


def _suite_module(root: pathlib.Path, name: str) -> str | None:
    """The module whose main(argv) runs suite `name`: benchmarks/<name>.py, or the package benchmarks/<name>/ whose
    __main__ imports main from its runner."""
    if (root / "benchmarks" / f"{name}.py").is_file():
        return f"benchmarks.{name}"
    if (root / "benchmarks" / name / "runner.py").is_file():
        return f"benchmarks.{name}.runner"
    return None


def available_suites(root: pathlib.Path) -> list[str]:
    return [name for name in SUITES if _suite_module(root, name)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = find_checkout()
    if root is None:
        print(f"electra-triton bench: {_WHERE}", file=sys.stderr)
        return 2
    suites = available_suites(root)
    if not argv or argv[0] not in suites:
        print(f"usage: electra-triton bench {{{','.join(suites)}}} [options]   (from {root}; `electra-triton bench "
              "SUITE --help` lists a suite's options)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(_suite_module(root, argv[0])).main(argv[1:])
