"""PNG plots of benchmark results. matplotlib is optional: without it no plot is written and the caller says so.

Every function takes result rows (the dicts in kernels.json / pretrain.json), writes one PNG, and returns its path, or
None when there is nothing to plot or matplotlib is missing.
"""

import pathlib
import re
from typing import Any

from .common import OURS


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; the GPU machine has no display
    import matplotlib.pyplot as plt

    return plt


def available() -> bool:
    """Whether plots can be written (matplotlib importable)."""
    return _pyplot() is not None


def _title(title: str, toy: bool) -> str:
    return f"TOY RUN ON CPU, NOT A RESULT - {title}" if toy else title


def _seq_len(row: dict) -> int | None:
    if row.get("seq_len") is not None:
        return int(row["seq_len"])
    match = re.search(r"\bL=(\d+)", str(row.get("case", "")))
    return int(match.group(1)) if match else None


def attention_tflops(rows: list[dict], path: pathlib.Path, device: str, toy: bool = False) -> pathlib.Path | None:
    """Attention TFLOP/s over sequence length, one line per impl; a panel per (variant, pass) of the first dtype.

    The variant is the case with its `L=...` removed (e.g. "mask dropout"), so a line joins the same configuration
    at every length.
    """
    rows = [r for r in rows if r.get("op") == "attention" and r.get("tflops") and _seq_len(r) is not None]
    plt = _pyplot()
    if not rows or plt is None:
        return None
    dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in rows) else rows[0]["dtype"]
    rows = [r for r in rows if r["dtype"] == dtype]
    variants = sorted({re.sub(r"\s*\bL=\d+\s*", " ", str(r["case"])).strip() for r in rows})
    passes = [p for p in ("fwd", "bwd", "fwd+bwd") if any(r["pass"] == p for r in rows)]
    passes += sorted({r["pass"] for r in rows} - set(passes))
    impls = sorted({r["impl"] for r in rows}, key=lambda name: (not name.startswith(OURS), name))
    colors = {impl: f"C{k % 10}" for k, impl in enumerate(impls)}  # one color per impl in every panel
    lengths = sorted({_seq_len(r) for r in rows})
    fig, axes = plt.subplots(len(variants), len(passes), squeeze=False, sharey=True,
                             figsize=(4.5 * len(passes), 3.2 * len(variants)))
    for i, variant in enumerate(variants):
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            panel = [r for r in rows if r["pass"] == pass_
                     and re.sub(r"\s*\bL=\d+\s*", " ", str(r["case"])).strip() == variant]
            for impl in impls:
                points = sorted((_seq_len(r), r["tflops"]) for r in panel if r["impl"] == impl)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl,
                            color=colors[impl], linewidth=2.5 if impl.startswith(OURS) else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_title(f"{variant or 'no mask, no dropout'} - {pass_}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("TFLOP/s")
            if panel:
                ax.legend(fontsize=7)
    fig.suptitle(_title(f"attention, {dtype}, {device}", toy))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def kernel_speedups(rows: list[dict], path: pathlib.Path, device: str, toy: bool = False) -> pathlib.Path | None:
    """Horizontal bars: our speedup over the strongest alternative, per (op, case), one bar per dtype.

    Training runs forward + backward, so an op with a fwd+bwd pass shows that pass only; kernels.md has them all.
    """
    ours = [r for r in rows if r.get("speedup") is not None]
    trained = {r["op"] for r in ours if r["pass"] == "fwd+bwd"}
    ours = [r for r in ours if r["op"] not in trained or r["pass"] == "fwd+bwd"]
    plt = _pyplot()
    if not ours or plt is None:
        return None
    labels = sorted({(r["op"], r["case"], r["pass"]) for r in ours})
    dtypes = sorted({r["dtype"] for r in ours})
    height = 0.8 / len(dtypes)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.3 * len(labels) * len(dtypes)))
    for k, dtype in enumerate(dtypes):
        values = {(r["op"], r["case"], r["pass"]): r["speedup"] for r in ours if r["dtype"] == dtype}
        ax.barh([i + k * height for i in range(len(labels))], [values.get(label, 0.0) for label in labels],
                height=height, label=dtype)
    ax.set_yticks([i + height * (len(dtypes) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels([" | ".join(label) for label in labels], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("speedup vs the strongest alternative (>1: ours faster)")
    ax.legend()
    ax.set_title(_title(f"electra-triton kernels, {device}", toy), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pretrain_throughput(runs: list[dict], path: pathlib.Path, device: str, toy: bool = False) -> pathlib.Path | None:
    """Grouped bars: tokens/s per backend for each (task, preset, seq_len, batch_size); skipped runs leave gaps."""
    plt = _pyplot()
    measured = [r for r in runs if r.get("tokens_per_s")]
    if not measured or plt is None:
        return None
    groups = list(dict.fromkeys((r.get("task", "pretrain"), r["preset"], r["seq_len"], r["batch_size"]) for r in runs))
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    for k, backend in enumerate(backends):
        values = {(r.get("task", "pretrain"), r["preset"], r["seq_len"], r["batch_size"]): r["tokens_per_s"]
                  for r in measured if r["backend"] == backend}
        ax.bar([i + k * width for i in range(len(groups))], [values.get(g, 0.0) or 0.0 for g in groups],
               width=width, label=backend)
    ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{task}\n{preset} L={seq} B={batch}" for task, preset, seq, batch in groups], fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    ax.set_title(_title(f"ELECTRA training step throughput, {device}", toy), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
