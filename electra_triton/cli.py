"""The `electra-triton` console script: one subcommand per job, each a module with main(argv) -> exit code."""

import importlib
import sys

SUBCOMMANDS = {
    "check-compile": ("electra_triton.compile_check", "compile every kernel config for sm_90a/sm_80, report spills"),
    "prepare": ("electra_triton.pretrain.prepare", "tokenize a corpus once into token shards for pretrain --data"),
    "pretrain": ("electra_triton.pretrain", "pre-train ELECTRA generator + discriminator; no arguments: tiny demo run"),
    "plot": ("electra_triton.pretrain.plots", "PNG curves of one pre-training run, or several compared"),
    "bench": ("electra_triton.bench", "run a benchmark suite of the source checkout (kernels, pretrain, ...)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        usage = "\n".join(f"  {name:14} {text}" for name, (_, text) in SUBCOMMANDS.items())
        print(f"usage: electra-triton {{{','.join(SUBCOMMANDS)}}} [options]\n\n{usage}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _ = SUBCOMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
