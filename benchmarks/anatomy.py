"""Step anatomy: what one production pre-training step executes on a GPU, op by op, and its PROJECTED time.

    python -m benchmarks.anatomy --preset base --seq-len 512 --batch-size 32 --out DIR
    python -m benchmarks.anatomy --preset base --seq-len 512 --batch-size 32 --backends hf-sdpa electra-triton \\
        --fill 0.8 --out DIR

For each backend it traces the step `electra-triton pretrain` runs (electra_triton.pretrain.step.TrainStep: generator
+ discriminator forward, backward, clipping, fused AdamW, schedule, metrics) with `electra_triton.tracing.OpTrace`,
prices every op (`electra_triton.op_costs`: FLOPs, bytes read and written, kernel launches, host syncs) and projects
its time on an H100 and an H200 with a roofline (`benchmarks/roofline.py`, where the efficiency factors live). It
writes DIR/anatomy.json and DIR/anatomy.md. `run(preset, seq_len, batch_size, backends, fill)` returns the same
payload, for benchmarks/gpu.py to put the projection beside each measurement.

How it runs without a GPU, and why this way: base at 32 x 512 is far too slow to run for real on a CPU (and the
Triton interpreter would take hours), and a scaled-down real run would not scale simply (attention grows with L^2,
the vocabulary does not shrink). So the models are built and stepped on fake tensors (torch's FakeTensorMode: shapes,
dtypes, no memory, no arithmetic), which the fused ops support through their registered fake implementations. The
batch itself stays real (OpTrace's fake mode computes ops on host data for real), so every data-dependent shape and
every host sync that depends on the batch (mask checks, unpadding, boolean indexing) happens exactly as on a GPU.
Fake tensors must sit on the CPU (this torch has no CUDA), so three GPU facts are set explicitly:
- the fused ops take their kernel path (`ops._dispatch.kernel_path_for_tracing()`), as they do on CUDA tensors;
- an encoder that takes an `unpad_plan` (the patched one) gets it with the batch, built on the CPU as the loader
  builds it; stock transformers gets the padded batch;
- autocast is bf16 (CPU autocast: its cast lists are close to, not identical with, CUDA's);
- the library kernels CUDA picks are used where CPU dispatch differs: `F.scaled_dot_product_attention` is one fused
  attention op with FlashAttention-2 costs (CUDA's flash / memory-efficient kernels, not the CPU's math path), and
  dropout is `native_dropout` (CUDA's fused dropout, not the CPU's bernoulli + mul).
Every projected number is labelled PROJECTED: it is a model, calibrated by the GPU runs, never a measurement.
"""

import argparse
import contextlib
import json
import pathlib
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import electra_triton
from electra_triton import op_costs
from electra_triton.op_costs import OpCost, op_cost
from electra_triton.ops import _dispatch, unpad_plan
from electra_triton.presets import PRESETS
from electra_triton.pretrain.config import PretrainConfig
from electra_triton.pretrain.model import ElectraPretrainer, accepts_unpad_plan, flops_per_token
from electra_triton.pretrain.step import TrainStep, build_optimizer, build_scheduler
from electra_triton.tracing import OpRecord, OpTrace

from . import roofline
from .pretrain import build_pretrainer, synthetic_pretrain_batches

BACKENDS = ("hf-sdpa", "electra-triton")
GENERATOR_HEAD = "generator.head"  # the LM head logits, cross-entropy, sampling and the replaced tokens
PREDICTIONS = "generator.predictions"  # the generator's dense + LayerNorm before the LM head: not part of the head


# --------------------------------------------------------------------------------------- CUDA's library kernels


@torch.library.custom_op("electra_triton_anatomy::sdpa_forward", mutates_args=())
def _sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError("a cost model of CUDA's fused SDPA kernels: it runs on fake tensors only")


@_sdpa_forward.register_fake
def _(q, k, v, mask, dropout_p, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("electra_triton_anatomy::sdpa_backward", mutates_args=())
def _sdpa_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError("a cost model of CUDA's fused SDPA kernels: it runs on fake tensors only")


@_sdpa_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, dropout_p, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_setup(ctx, inputs, output):
    q, k, v, mask, dropout_p, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask)
    ctx.scalars = (dropout_p, scale)


def _sdpa_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    return (*_sdpa_backward(grad_out, q, k, v, out, lse, mask, *ctx.scalars), None, None, None)


_sdpa_forward.register_autograd(_sdpa_autograd, setup_context=_sdpa_setup)


def _sdpa_flops(q: Any, k: Any) -> float:
    *batch, queries, head_dim = q.shape
    batch_heads = 1
    for size in batch:
        batch_heads *= size
    return 4.0 * batch_heads * queries * k.shape[-2] * head_dim


def _sdpa_forward_cost(record: OpRecord) -> OpCost:
    args = record.arguments
    flops = _sdpa_flops(args["q"], args["k"])
    read = sum(meta.nbytes for meta in record.inputs)
    written = sum(meta.nbytes for meta in record.outputs)
    return OpCost(flops, flops, read, written, 1, attention=True, matmul_dtype=str(args["q"].dtype)[6:])


def _sdpa_backward_cost(record: OpRecord) -> OpCost:
    # FlashAttention-2's backward: 5 matmuls (QK^T recomputed) against the forward's 2, plus a preprocess kernel.
    args = record.arguments
    forward = _sdpa_flops(args["q"], args["k"])
    read = sum(meta.nbytes for meta in record.inputs)
    written = sum(meta.nbytes for meta in record.outputs)
    return OpCost(2.5 * forward, 2.0 * forward, read, written, 2, attention=True,
                  matmul_dtype=str(args["q"].dtype)[6:])


op_costs.declare("electra_triton_anatomy::sdpa_forward", _sdpa_forward_cost)
op_costs.declare("electra_triton_anatomy::sdpa_backward", _sdpa_backward_cost)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if is_causal or enable_gqa:
        raise ValueError("the anatomy models ELECTRA's attention: non-causal, as many key as query heads")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _sdpa_forward(query, key, value, attn_mask, dropout_p, scale)[0]


def _fused_dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def cuda_library_kernels() -> Iterator[None]:
    """Inside, SDPA and dropout dispatch as on CUDA: one fused op each (see the module docstring)."""
    saved = F.scaled_dot_product_attention, F.dropout
    F.scaled_dot_product_attention, F.dropout = _fused_sdpa, _fused_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = saved


# ------------------------------------------------------------------------------------------------------- tracing


def anatomy_batch(vocab_size: int, batch_size: int, seq_len: int, fill: float = 1.0, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """Rows of random words ([CLS] ... [SEP]), each holding round(fill * seq_len) real tokens then padding: fill 1 is
    a packed batch (as `--packing` data gives), lower fills model padded batches."""
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    batch = synthetic_pretrain_batches(vocab_size, batch_size, seq_len, 1, seed)[0]
    length = max(8, round(fill * seq_len))
    if length < seq_len:
        batch["input_ids"][:, length - 1] = batch["input_ids"][:, -1]  # [SEP] ends the real tokens
        batch["input_ids"][:, length:] = 0
        batch["attention_mask"][:, length:] = 0
    return batch


def _scoped_modules(model: ElectraPretrainer) -> dict[str, torch.nn.Module]:
    named: dict[str, torch.nn.Module] = {"embeddings": model.generator.electra.embeddings}  # shared by both models
    for role in ("generator", "discriminator"):
        electra = getattr(model, role).electra
        if hasattr(electra, "embeddings_project"):
            named[f"{role}.embeddings_project"] = electra.embeddings_project
        for index, layer in enumerate(electra.encoder.layer):
            named[f"{role}.layer.{index}"] = layer
    named[PREDICTIONS] = model.generator.generator_predictions
    return named


@contextlib.contextmanager
def _regions(trace: OpTrace, model: ElectraPretrainer, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Scopes that are not one module: each head from its encoder's output to the model's end, and the optimizer."""
    enter = lambda name: lambda *_: trace.enter_scope(name)  # noqa: E731
    leave = lambda *_: trace.exit_scope()  # noqa: E731
    handles = [
        model.generator.electra.register_forward_hook(enter(GENERATOR_HEAD)),
        model.discriminator.register_forward_pre_hook(leave),
        model.discriminator.electra.register_forward_hook(enter("discriminator.head")),
        model.discriminator.register_forward_hook(leave),
        optimizer.register_step_pre_hook(enter("optimizer")),
        optimizer.register_step_post_hook(leave),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_step(preset: str, seq_len: int, batch_size: int, backend: str, fill: float = 1.0
               ) -> tuple[OpTrace, ElectraPretrainer]:
    """The trace of one production step of `backend` (the second step: the first creates the optimizer state)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    recipe = PretrainConfig(preset=preset, output_dir="unused").resolved()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    previous_mode = _dispatch.get_kernel_mode()
    _dispatch.set_kernel_mode("auto")
    try:
        with fake:
            model = build_pretrainer(preset, "sdpa", seq_len)
            if backend == "electra-triton":
                electra_triton.patch(model.generator)
                electra_triton.patch(model.discriminator)
            model.train()
            # The optimizer, schedule and clipping `electra-triton pretrain` builds on CUDA (fused AdamW).
            optimizer = build_optimizer(model, recipe.lr, recipe.weight_decay, (recipe.adam_beta1, recipe.adam_beta2),
                                        recipe.adam_eps, torch.device("cpu"), fused=True)
            step = TrainStep(model, optimizer, build_scheduler(optimizer, recipe.warmup_steps, recipe.max_steps),
                             max_grad_norm=recipe.max_grad_norm,
                             autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        batch = anatomy_batch(model.generator.config.vocab_size, batch_size, seq_len, fill)
        if accepts_unpad_plan(model.generator):  # as the loader gives it: built on the CPU, no device sync
            batch["unpad_plan"] = unpad_plan(batch["attention_mask"])
        with _dispatch.kernel_path_for_tracing(), cuda_library_kernels():
            with OpTrace(fake):
                step([batch])
            trace = OpTrace(fake)
            with trace, trace.module_scopes(_scoped_modules(model)), _regions(trace, model, optimizer):
                step([batch])
    finally:
        _dispatch.set_kernel_mode(previous_mode)
    return trace, model


# ------------------------------------------------------------------------------------------------------ summaries


def _part(record: OpRecord, after_backward: bool) -> str:
    if record.scope:
        return record.scope[-1]
    if record.backward:
        return "other (backward)"
    return "other (clip, metrics)" if after_backward else "other (masking, glue)"


def _totals(items: list[tuple[OpRecord, OpCost]]) -> dict[str, Any]:
    device = [(r, c) for r, c in items if r.is_device_op or c.host_sync]
    h100 = sum(roofline.op_time_us(c, roofline.H100) for _, c in device) / 1e3
    h200 = sum(roofline.op_time_us(c, roofline.H200) for _, c in device) / 1e3
    return {
        "projected_ms": h100, "projected_ms_h200": h200,
        "device_ops": sum(r.is_device_op for r, _ in items), "host_syncs": sum(c.host_sync for _, c in items),
        "kernels": sum(c.kernels for _, c in items), "flops": sum(c.flops for _, c in items),
        "model_flops": sum(c.model_flops for _, c in items), "bytes": sum(c.bytes for _, c in items),
    }


def summarize(trace: OpTrace, backend: str) -> dict[str, Any]:
    """One run's entry of anatomy.json (times PROJECTED: ms, and us for each op of `ops`, in execution order)."""
    priced = [(record, op_cost(record)) for record in trace.records]
    first_backward = next((i for i, (r, _) in enumerate(priced) if r.backward), len(priced))
    parts: dict[str, list] = defaultdict(list)
    directions: dict[tuple[str, bool], list] = defaultdict(list)
    for index, (record, cost) in enumerate(priced):
        name = _part(record, index > first_backward)
        parts[name].append((record, cost))
        directions[(name, record.backward)].append((record, cost))
    breakdown = []
    for name, items in parts.items():
        entry = {"part": name, **_totals(items)}
        entry["forward_ms"] = _totals(directions[(name, False)])["projected_ms"]
        entry["backward_ms"] = _totals(directions[(name, True)])["projected_ms"]
        breakdown.append(entry)
    layers = {}
    for role in ("generator", "discriminator"):
        mine = [entry for entry in breakdown if entry["part"].startswith(f"{role}.layer.")]
        if mine:
            layers[role] = {key: sum(e[key] for e in mine) / len(mine) for key in mine[0] if key != "part"}
            layers[role]["count"] = len(mine)
    by_op: dict[str, list] = defaultdict(list)
    for record, cost in priced:
        if record.is_device_op or cost.host_sync:
            by_op[record.name].append((record, cost))
    top = sorted(({"op": op, "count": len(items), **_totals(items)} for op, items in by_op.items()),
                 key=lambda entry: -entry["projected_ms"])
    totals = _totals(priced)
    head = next((entry for entry in breakdown if entry["part"] == GENERATOR_HEAD), None)
    uncosted = sorted({r.name for r, _ in priced if r.is_device_op and "::" in r.name
                       and not r.name.startswith("aten::") and r.name not in op_costs.DECLARED})
    ops = [{"op": record.name, "part": _part(record, index > first_backward), "backward": record.backward,
            "flops": cost.flops, "bytes_read": cost.bytes_read, "bytes_written": cost.bytes_written,
            "kernels": cost.kernels, "host_sync": cost.host_sync,
            "projected_us": roofline.op_time_us(cost, roofline.H100)}
           for index, (record, cost) in enumerate(priced) if record.is_device_op or cost.host_sync]
    return {
        "backend": backend, "label": roofline.LABEL,
        "projected_step_ms": totals["projected_ms"], "projected_step_ms_h200": totals["projected_ms_h200"],
        "host_syncs": totals["host_syncs"], "sync_ops": [r.name for r, c in priced if c.host_sync],
        "device_ops": totals["device_ops"], "kernels": totals["kernels"], "flops": totals["flops"],
        "model_flops": totals["model_flops"], "bytes": totals["bytes"],
        "layers": layers, "parts": breakdown, "generator_head": head, "top_ops": top[:25],
        "estimated_records": sum(r.estimated for r in trace.records), "uncosted_ops": uncosted, "ops": ops,
    }


def run(preset: str, seq_len: int, batch_size: int, backends: Sequence[str] = BACKENDS, fill: float = 1.0
        ) -> dict[str, Any]:
    """The anatomy payload (what anatomy.json holds) of one pre-training step per backend; every time PROJECTED."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    runs = []
    for backend in backends:
        trace, model = trace_step(preset, seq_len, batch_size, backend, fill)
        entry = summarize(trace, backend)
        # The analytic count at the model's slot count (it takes (mask_prob + 0.005) * L slots per sequence, which
        # the model rounds down to whole slots).
        slot_share = model.num_slots / seq_len - 0.005
        analytic = flops_per_token(model.discriminator.config, model.generator.config, seq_len, slot_share)
        entry["analytic_model_flops"] = analytic * batch_size * seq_len
        runs.append(entry)
    payload = {
        "label": roofline.LABEL,
        "note": "PROJECTED times: a roofline over a traced step, not a measurement (see benchmarks/anatomy.py)",
        "preset": preset, "seq_len": seq_len, "batch_size": batch_size, "fill": fill,
        "precision": "bf16 autocast, fp32 master weights", "optimizer": "fused AdamW (the CUDA choice), clip 1.0",
        "devices": {key: {"name": d.name, "matmul_tflops": d.matmul_tflops, "memory_tbps": d.memory_tbps}
                    for key, d in roofline.DEVICES.items()},
        "efficiency": roofline.EFFICIENCY.as_dict(), "runs": runs,
    }
    baseline = next((r for r in runs if r["backend"] == "hf-sdpa"), None)
    if baseline is not None:
        for entry in runs:
            entry["step_vs_hf_sdpa"] = entry["projected_step_ms"] / baseline["projected_step_ms"]
            if entry["generator_head"] and baseline["generator_head"]:
                entry["head_vs_hf_sdpa"] = (entry["generator_head"]["projected_ms"]
                                            / baseline["generator_head"]["projected_ms"])
    return payload


# ------------------------------------------------------------------------------------------------------- output


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def render_markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"# Step anatomy, {payload['preset']} {payload['batch_size']} x {payload['seq_len']} (fill "
        f"{payload['fill']:.2f}): PROJECTED",
        "",
        "**PROJECTED**: op-by-op roofline over a traced production step (fake tensors, no GPU); not a measurement.",
        f"Efficiency factors (benchmarks/roofline.py): {payload['efficiency']}. Peaks: "
        + "; ".join(f"{d['name']} {d['matmul_tflops']['bfloat16']:.0f} TFLOP/s bf16, {d['memory_tbps']} TB/s"
                    for d in payload["devices"].values()) + ".",
        "",
        "| backend | PROJECTED H100 step ms | PROJECTED H200 step ms | vs hf-sdpa | host syncs | device ops | "
        "kernels | TFLOP | GB | PROJECTED head ms | head vs hf-sdpa |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_ in payload["runs"]:
        head = run_["generator_head"] or {}
        lines.append(
            f"| {run_['backend']} | {_fmt(run_['projected_step_ms'])} | {_fmt(run_['projected_step_ms_h200'])} | "
            f"{_fmt(run_.get('step_vs_hf_sdpa', float('nan')))}x | {run_['host_syncs']} | {run_['device_ops']} | "
            f"{run_['kernels']} | {_fmt(run_['flops'] / 1e12, 3)} | {_fmt(run_['bytes'] / 1e9, 2)} | "
            f"{_fmt(head.get('projected_ms', float('nan')), 3)} | {_fmt(run_.get('head_vs_hf_sdpa', float('nan')))}x |")
    for run_ in payload["runs"]:
        lines += ["", f"## {run_['backend']}: parts (PROJECTED H100 ms)", "",
                  "| part | fwd ms | bwd ms | total ms | device ops | host syncs | GFLOP | MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for entry in run_["parts"]:
            lines.append(f"| {entry['part']} | {_fmt(entry['forward_ms'], 3)} | {_fmt(entry['backward_ms'], 3)} | "
                         f"{_fmt(entry['projected_ms'], 3)} | {entry['device_ops']} | {entry['host_syncs']} | "
                         f"{_fmt(entry['flops'] / 1e9, 1)} | {_fmt(entry['bytes'] / 1e6, 1)} |")
        lines += ["", "Top ops (PROJECTED H100 ms): " + ", ".join(
            f"{op['op']} x{op['count']} {_fmt(op['projected_ms'], 3)}" for op in run_["top_ops"][:10]),
            "", f"Host syncs: {dict(Counter(run_['sync_ops']))}"]
        if run_["uncosted_ops"]:
            lines.append(f"Ops without a declared cost (priced as memory-bound): {run_['uncosted_ops']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.anatomy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--fill", type=float, default=1.0, help="real tokens per row / seq-len (default 1: packed)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="results folder (created)")
    args = parser.parse_args(argv)
    payload = run(args.preset, args.seq_len, args.batch_size, args.backends, args.fill)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "anatomy.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.out / "anatomy.md").write_text(render_markdown(payload))
    for run_ in payload["runs"]:
        print(f"[anatomy] {run_['backend']}: PROJECTED H100 step {run_['projected_step_ms']:.2f} ms, host syncs "
              f"{run_['host_syncs']}, device ops {run_['device_ops']}", flush=True)
    print(f"[anatomy] wrote {args.out / 'anatomy.json'}, {args.out / 'anatomy.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
