"""End-to-end: one full ELECTRA pre-training step per backend, plus a fine-tuning-shaped step.

    python -m benchmarks.pretrain --out DIR                                  # GPU: small, base, large x 128, 512
    python -m benchmarks.pretrain --out DIR --presets base --seq-lens 512    # the headline case only
    python -m benchmarks.pretrain --out DIR --toy                            # CPU smoke test (implied without CUDA)
    python -m benchmarks.pretrain --out DIR --synthetic                      # random full rows, not the pipeline

The pre-training step is the production one: `electra_triton.pretrain.step.TrainStep`, the function `electra-triton
pretrain` runs per optimizer step, built as that command builds it for the preset (AdamW without decay on biases and
LayerNorm, fused on CUDA, foreach elsewhere; the preset's learning-rate schedule; gradient clipping at 1.0 on the
device; metrics summed on the device, never read while timing; bf16 autocast with fp32 master weights on CUDA). The
model is the project's ElectraPretrainer: HF ElectraForMaskedLM generator + ElectraForPreTraining discriminator with
shared embeddings, 15 % masking into a fixed number of slots, the generator's LM head on the masked slots only,
Gumbel-max sampling, loss = mlm + 50 * rtd. Batches come from the command's data pipeline (ExampleStream and Batcher:
one example per row with its padding, or `--packing on` as the command packs them, with unpad plans for an encoder
that takes them) on `--corpus` (default: the built-in stdlib corpus), drawn before timing; `--synthetic` replaces
them with full rows of random tokens. Every result says which (`data`) and its `fill` (real tokens / slots). Every
backend runs the same weights (same seed), the same batches (rotated) and the same batch size:

    hf-eager                 transformers with attn_implementation="eager"
    hf-sdpa                  transformers with attn_implementation="sdpa"
    hf-sdpa-compile          hf-sdpa, the pre-trainer module under torch.compile (default mode)
    electra-triton           hf-sdpa models, then electra_triton.patch(generator), patch(discriminator)
    electra-triton-compile   electra-triton under torch.compile

The fine-tuning-shaped run times ElectraForSequenceClassification (the preset's discriminator, 2 labels) for one
training step on batches of lengths uniform in [32, 512], right-padded to the batch's longest (a multiple of 8), as a
fine-tuning script with a padding collator would feed it.

Reported per run: step time (median, 20th/80th percentile, min, max over the timed steps, each timed with CUDA events
without synchronising in between), tokens/s = tokens per step / median step time (fine-tuning: real tokens, padding
excluded), peak memory allocated during the timed steps (absolute: weights + optimizer state + activations), and MFU.

MFU = model FLOPs per step / median step time / the matmul ceiling measured in the same run (a large bf16 GEMM), so it
is relative to what this device's cuBLAS reaches, not its datasheet peak (`mfu_datasheet` gives that where known).
Model FLOPs count matmuls only, forward + backward = 3 x forward, no recomputation:
- dense parts: 6 x (weights of every linear layer) x (tokens that layer sees): encoders, embedding projections and
  the discriminator head on every token; the generator's head (dense + the E x V LM head) on the masked slots only;
- attention: 3 x 4 x L x hidden per token per layer (QK^T and PV), i.e. 12 L^2 hidden per sequence and layer.
(electra_triton.pretrain.model.flops_per_token for pre-training; `finetune_flops` below for fine-tuning.)

A run that does not fit in memory is recorded with status "oom", a failure (a compile error, say) with status "error"
and the message, a backend that cannot run yet (electra_triton.patch not merged) with status "skipped" and why; the
suite goes on. DIR/pretrain.json is rewritten after every run, so a run stopped at a time limit keeps what it measured.
"""

import argparse
import gc
import json
import pathlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining, ElectraForSequenceClassification

import electra_triton
from electra_triton.ops import get_kernel_mode, set_kernel_mode
from electra_triton.ops._dispatch import KERNEL_MODES
from electra_triton.presets import PRESETS
from electra_triton.pretrain.config import BUILTIN_CORPUS, PretrainConfig
from electra_triton.pretrain.data import ExampleStream, load_tokenizer, resolve_corpus, special_ids, train_tokenizer
from electra_triton.pretrain.model import (
    ElectraPretrainer,
    accepts_unpad_plan,
    flops_per_token,
    peak_flops,
    share_embeddings,
)
from electra_triton.pretrain.packing import Batcher
from electra_triton.pretrain.step import TrainStep, autocast_for, build_optimizer, build_scheduler, to_device

from . import plots
from .common import Bench, environment, markdown_table, write_json

BACKENDS = ("hf-eager", "hf-sdpa", "hf-sdpa-compile", "electra-triton", "electra-triton-compile")
BASELINES = ("hf-sdpa", "hf-sdpa-compile")  # the ratios the targets are stated against
PAD, CLS, SEP, MASK = 0, 101, 102, 103  # BERT/ELECTRA vocabulary ids of the special tokens
FIRST_WORD_ID = 999  # ids below are special or unused in the BERT vocabulary


def _backend_settings(backend: str) -> tuple[str, bool, bool]:
    """(attn_implementation, patch with electra_triton, torch.compile) of a backend."""
    return ("eager" if backend == "hf-eager" else "sdpa", backend.startswith("electra-triton"),
            backend.endswith("-compile"))


def _patch_unavailable() -> str | None:
    if getattr(electra_triton, "patch", None) is None:
        return "electra_triton.patch does not exist yet (issue 5 not merged)"
    return None


def _config(fields: dict[str, Any], attn_implementation: str) -> ElectraConfig:
    return ElectraConfig(**fields, attn_implementation=attn_implementation)


# ----------------------------------------------------------------------------------------------------------- batches


class PretrainData:
    """Where the pre-training batches come from: the production pipeline (a corpus, its tokenizer, the command's
    Batcher with or without packing), or synthetic full rows (`--synthetic`, labelled so in the results)."""

    def __init__(self, sources: list[tuple[str, str]] | None = None, tokenizer=None, packing: bool = False):
        self.sources, self.tokenizer, self.packing = sources, tokenizer, packing

    @property
    def synthetic(self) -> bool:
        return self.tokenizer is None

    @property
    def label(self) -> str:
        return "synthetic" if self.synthetic else "pipeline, packed" if self.packing else "pipeline"

    def special_ids(self) -> tuple[list[int], int]:
        """(special token ids, [MASK] id) of the batches' vocabulary."""
        if self.synthetic:
            return [PAD, CLS, SEP, MASK], MASK
        return special_ids(self.tokenizer), self.tokenizer.mask_token_id

    def batches(self, vocab_size: int, batch_size: int, seq_len: int, count: int, seed: int, plan: bool = False
                ) -> list[dict]:
        """plan: packed batches carry an `unpad_plan` (for encoders that take one, as the command gives them)."""
        if self.synthetic:
            return synthetic_pretrain_batches(vocab_size, batch_size, seq_len, count, seed)
        return pipeline_batches(self.sources, self.tokenizer, batch_size, seq_len, count, seed, self.packing, plan)


def prepare_data(corpus: list[str] | None, tokenizer: str | None, tokenizer_docs: int, vocab_size: int,
                 packing: bool = False) -> PretrainData:
    """The production pipeline's inputs: None corpus means synthetic batches. Without a tokenizer folder one is trained
    on the corpus, as `electra-triton pretrain` does (its vocabulary may come out smaller than the model's; ids stay
    in range and the padding is the pipeline's)."""
    if corpus is None:
        return PretrainData()
    sources = resolve_corpus(corpus)
    if tokenizer:
        return PretrainData(sources, load_tokenizer(tokenizer), packing)
    return PretrainData(sources, train_tokenizer(sources, vocab_size, tokenizer_docs, model_max_length=512), packing)


def pipeline_batches(sources: list[tuple[str, str]], tokenizer, batch_size: int, seq_len: int, count: int,
                     seed: int, packing: bool = False, plan: bool = False) -> list[dict]:
    """Batches as `electra-triton pretrain` feeds them: its ExampleStream and Batcher (packing, padding, shuffle
    buffer, unpad plans), drawn ahead so that the timed steps do not wait for tokenization."""
    recipe = PretrainConfig()
    stream = ExampleStream(sources, tokenizer, seq_len, seed, rank=0, world_size=1,
                           shuffle_buffer=recipe.shuffle_buffer)
    batcher = Batcher(stream, seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, packing,
                      recipe.mask_prob, plan=plan)
    return [batcher.next_batch(batch_size) for _ in range(count)]


def synthetic_pretrain_batches(vocab_size: int, batch_size: int, seq_len: int, count: int, seed: int
                               ) -> list[dict]:
    """`--synthetic`: full rows ([CLS] random words [SEP], no padding)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch_size, seq_len), generator=gen)  # (B, L)
        ids[:, 0], ids[:, -1] = CLS, SEP
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "token_type_ids": torch.zeros_like(ids)})
    return batches


def finetune_batches(vocab_size: int, batch_size: int, min_len: int, max_len: int, count: int, seed: int
                     ) -> list[dict]:
    """Batches of lengths uniform in [min_len, max_len], right-padded to the longest rounded up to a multiple of 8."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=gen)  # (B,)
        width = min(max_len, -(-int(lengths.max()) // 8) * 8)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, W)
        ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch_size, width), generator=gen) * mask
        ids[:, 0] = CLS
        ids.scatter_(1, (lengths - 1)[:, None], SEP)
        labels = torch.randint(0, 2, (batch_size,), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                        "labels": labels})
    return batches


def finetune_flops(config: ElectraConfig, lengths: list[int]) -> float:
    """Training FLOPs (3 x forward, matmuls only) of ElectraForSequenceClassification on real tokens only."""
    h, i = config.hidden_size, config.intermediate_size
    per_token = config.num_hidden_layers * 2 * (4 * h * h + 2 * h * i)
    per_token += 2 * config.embedding_size * h if config.embedding_size != h else 0
    attention = config.num_hidden_layers * 2 * 2 * h * sum(n * n for n in lengths)  # QK^T and PV over real keys
    head = len(lengths) * 2 * (h * h + h * config.num_labels)  # classifier on [CLS] only
    return 3 * (per_token * sum(lengths) + attention + head)


# ------------------------------------------------------------------------------------------------------------ models


def build_pretrainer(preset: str, attn_implementation: str, seq_len: int, specials: list[int] | None = None,
                     mask_id: int = MASK, packing: bool = False) -> ElectraPretrainer:
    """The pre-trainer `electra-triton pretrain` builds for `preset` (the preset's vocabulary size, the recipe's
    defaults), with the given attention implementation."""
    fields = PRESETS[preset]
    discriminator = ElectraForPreTraining(_config({**fields["discriminator"], "pad_token_id": PAD},
                                                  attn_implementation))
    generator = ElectraForMaskedLM(_config({**fields["generator"], "pad_token_id": PAD}, attn_implementation))
    share_embeddings(generator, discriminator)
    recipe = PretrainConfig(preset=preset, output_dir="unused").resolved()
    return ElectraPretrainer(generator, discriminator, specials or [PAD, CLS, SEP, MASK], mask_id, recipe.mask_prob,
                             recipe.mask_token_prob, recipe.random_token_prob, recipe.rtd_weight, recipe.temperature,
                             max_seq_len=seq_len, packing=packing)


def production_step(model: torch.nn.Module, forward_module: torch.nn.Module, preset: str, device: torch.device,
                    metric_keys: tuple[str, ...] | None = None) -> TrainStep:
    """The step `electra-triton pretrain` runs, with the preset's optimizer, schedule, clipping and autocast.

    forward_module: what the step calls (the model or its torch.compile wrapper); the optimizer holds model's
    parameters."""
    cfg = PretrainConfig(preset=preset, output_dir="unused").resolved()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps,
                                device)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps)
    extra = {} if metric_keys is None else {"metric_keys": metric_keys}
    return TrainStep(forward_module, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                     autocast=autocast_for(device, cfg.precision), parameters=model.parameters(), **extra)


# ------------------------------------------------------------------------------------------------------------ timing


def time_steps(step: Callable[[list[dict]], None], batches: list[dict], warmup: int, steps: int,
               device: torch.device) -> tuple[dict[str, float], float | None]:
    """Step times in ms (median, p20, p80, min, max) over `steps` steps after `warmup` ones, and peak memory in GiB."""
    for i in range(warmup):
        step([batches[i % len(batches)]])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (start, end) in enumerate(events):
            start.record()
            step([batches[i % len(batches)]])
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        times = []
        for i in range(steps):
            begin = time.perf_counter()
            step([batches[i % len(batches)]])
            times.append((time.perf_counter() - begin) * 1e3)
        peak = None
    times.sort()
    quantile = lambda q: times[min(len(times) - 1, round(q * (len(times) - 1)))]
    return ({"median": statistics.median(times), "p20": quantile(0.2), "p80": quantile(0.8), "min": times[0],
             "max": times[-1]}, peak)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------------- runs


def _record(task: str, preset: str, seq_len: int, batch_size: int, backend: str) -> dict[str, Any]:
    return {"task": task, "preset": preset, "seq_len": seq_len, "batch_size": batch_size, "backend": backend,
            "status": None, "reason": None, "tokens_per_s": None, "step_ms": None, "step_ms_p20": None,
            "step_ms_p80": None, "step_ms_min": None, "step_ms_max": None, "mfu": None, "mfu_datasheet": None,
            "peak_mem_gb": None, "flops_per_step": None, "tokens_per_step": None, "data": None, "fill": None}


def run_one(task: str, preset: str, seq_len: int, batch_size: int, backend: str, settings: dict) -> dict[str, Any]:
    """Build, warm up and time one (task, preset, seq_len, backend); never raises for OOM or a failing backend."""
    record = _record(task, preset, seq_len, batch_size, backend)
    attn, patch, compile_ = _backend_settings(backend)
    if patch and (reason := _patch_unavailable()):
        return {**record, "status": "skipped", "reason": reason}
    device: torch.device = settings["device"]
    torch.manual_seed(settings["seed"])  # identical initial weights for every backend
    try:
        if task == "pretrain":
            data: PretrainData = settings["data"]
            model: torch.nn.Module = build_pretrainer(preset, attn, seq_len, *data.special_ids(), packing=data.packing)
            if patch:  # before drawing batches: whether they carry an unpad plan depends on the patched encoder
                for module in (model.generator, model.discriminator):
                    electra_triton.patch(module)
            plan = patch and accepts_unpad_plan(model.generator)
            if data.packing and patch and not plan:
                return {**record, "status": "skipped", "reason": "packed rows need an encoder that takes unpad_plan "
                        "(as `electra-triton pretrain --packing on` requires); this patch has none"}
            vocab = model.generator.config.vocab_size
            batches = data.batches(vocab, batch_size, seq_len, settings["rotations"], settings["seed"], plan)
            record["data"] = data.label
            tokens = batch_size * seq_len
            flops = flops_per_token(model.discriminator.config, model.generator.config, seq_len, model.mask_prob)
            flops *= tokens
            record["fill"] = statistics.mean(float(b["attention_mask"].float().mean()) for b in batches)
        else:
            config = _config({**PRESETS[preset]["discriminator"], "pad_token_id": PAD, "num_labels": 2}, attn)
            model = ElectraForSequenceClassification(config)
            batches = finetune_batches(config.vocab_size, batch_size, settings["min_len"], seq_len,
                                       settings["rotations"], settings["seed"])
            record["data"] = "synthetic"  # the shape of a padding collator's batches, not a corpus
            lengths = [b["attention_mask"].sum(1).tolist() for b in batches]
            tokens = statistics.mean(sum(x) for x in lengths)
            flops = statistics.mean(finetune_flops(config, x) for x in lengths)
            if patch:
                electra_triton.patch(model)
        model.to(device).train()
        forward_module = torch.compile(model, backend=settings["compile_backend"]) if compile_ else model
        batches = [to_device(b, device) for b in batches]  # the copy to the device is not what is timed
        step = production_step(model, forward_module, preset, device,
                               None if task == "pretrain" else ("loss",))
        timing, peak = time_steps(step, batches, settings["warmup"], settings["steps"], device)
    except torch.cuda.OutOfMemoryError as error:
        record.update(status="oom", reason=str(error).split("\n")[0][:500])
    except Exception as error:  # a backend that fails (compile error, unsupported config) must not end the suite
        # An OOM inside torch.compile arrives wrapped in the compiler's own exception.
        record.update(status="oom" if "out of memory" in str(error).lower() else "error",
                      reason=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc(limit=12)[-4000:])
    else:
        ms = timing["median"]
        datasheet = peak_flops(device)
        record.update(status="ok", tokens_per_s=tokens / ms * 1e3, step_ms=ms, step_ms_p20=timing["p20"],
                      step_ms_p80=timing["p80"], step_ms_min=timing["min"], step_ms_max=timing["max"],
                      mfu=flops / ms / 1e9 / settings["matmul_tflops"],
                      mfu_datasheet=flops / ms * 1e3 / datasheet if datasheet else None,
                      peak_mem_gb=peak, flops_per_step=flops, tokens_per_step=tokens)
    finally:
        model = forward_module = step = batches = None
        if compile_:
            torch._dynamo.reset()
        _free(device)
    return record


def plan(args: argparse.Namespace, toy: bool) -> list[tuple[str, str, int, int]]:
    """(task, preset, seq_len, batch_size) of every run, in order."""
    runs = []
    for preset in args.presets:
        for seq_len in args.seq_lens:
            batch_size = args.batch_size or max(1, args.tokens_per_step // seq_len)
            runs.append(("pretrain", preset, seq_len, batch_size))
    if args.finetune:
        runs.append(("finetune", args.finetune_preset, args.finetune_max_len, args.finetune_batch_size))
    return runs


# ----------------------------------------------------------------------------------------------------------- results


def _ratios(runs: list[dict]) -> None:
    """Add tokens/s and peak-memory ratios of each run against the baselines of the same case."""
    for run in runs:
        for baseline in BASELINES:
            ref = next((r for r in runs if r["status"] == "ok" and r["backend"] == baseline
                        and all(r[k] == run[k] for k in ("task", "preset", "seq_len", "batch_size"))), None)
            ok = run["status"] == "ok" and ref is not None
            run[f"speedup_vs_{baseline}"] = run["tokens_per_s"] / ref["tokens_per_s"] if ok else None
            mem_ok = ok and run["peak_mem_gb"] is not None and ref["peak_mem_gb"]
            run[f"mem_vs_{baseline}"] = run["peak_mem_gb"] / ref["peak_mem_gb"] if mem_ok else None


COLUMNS = ("task", "preset", "seq_len", "batch_size", "backend", "status", "tokens_per_s", "step_ms", "step_ms_p20",
           "step_ms_p80", "mfu", "peak_mem_gb", "speedup_vs_hf-sdpa", "speedup_vs_hf-sdpa-compile", "mem_vs_hf-sdpa")


def render_markdown(payload: dict) -> str:
    lines = ["**TOY RUN ON CPU: sizes and timings are not results.**", ""] if payload["toy"] else []
    lines += [f"Device: {payload['device']}; torch {payload['torch']}, triton {payload['triton']}, transformers "
              f"{payload['transformers']}; commit {payload['commit']}. Measured matmul ceiling "
              f"{payload['matmul_tflops']:.1f} TFLOP/s, copy {payload['copy_gbps']:.0f} GB/s.",
              f"One training step ({payload['settings']['precision']}): median of {payload['settings']['steps']} "
              f"steps after {payload['settings']['warmup']} warm-up steps; p20/p80 give the spread. MFU against the "
              "measured matmul ceiling; FLOPs formula in benchmarks/pretrain.py. Fine-tuning tokens/s counts real "
              "tokens only.", "", markdown_table(payload["runs"], COLUMNS), ""]
    for run in payload["runs"]:
        if run["status"] != "ok":
            lines.append(f"- {run['task']} {run['preset']} L={run['seq_len']} {run['backend']}: {run['status']}: "
                         f"{run['reason']}")
    return "\n".join(lines).rstrip() + "\n"


def write_results(out: pathlib.Path, payload: dict, with_plot: bool) -> None:
    _ratios(payload["runs"])
    write_json(out / "pretrain.json", payload)
    (out / "pretrain.md").write_text(render_markdown(payload))
    if with_plot:
        written = plots.pretrain_throughput(payload["runs"], out / "pretrain_throughput.png", payload["device"],
                                            payload["toy"])
        print(f"[pretrain] plot: {written or 'not written (matplotlib missing or nothing measured)'}", flush=True)


def merge_payloads(payloads: list[dict], sources: list[pathlib.Path]) -> dict:
    """One payload from several runs of this script: the first one's header, every run, where each came from."""
    merged = {**payloads[0], "runs": [run for payload in payloads for run in payload["runs"]]}
    merged["merged_from"] = [{"path": str(source), **{k: payload.get(k) for k in ("device", "commit", "commit_dirty",
                                                                                  "matmul_tflops", "copy_gbps")}}
                             for source, payload in zip(sources, payloads, strict=True)]
    if len({(item["device"], item["commit"]) for item in merged["merged_from"]}) > 1:
        print("[pretrain] warning: merging runs from different devices or commits", flush=True)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="results folder (created)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--toy", action="store_true", help="toy sizes (implied on CPU): a smoke test, not results")
    parser.add_argument("--presets", nargs="*", choices=sorted(PRESETS),
                        help="pre-training presets; default: small base large (toy: tiny); none: fine-tuning only")
    parser.add_argument("--seq-lens", nargs="+", type=int, help="default: 128 512 (toy: 32 64)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--tokens-per-step", type=int, help="batch size = this // seq_len (default 16384; toy 64)")
    parser.add_argument("--batch-size", type=int, help="fixed batch size for every pre-training run")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false", help="skip the fine-tuning run")
    parser.add_argument("--finetune-preset", help="default: base (toy: tiny)")
    parser.add_argument("--finetune-batch-size", type=int, help="default 32 (toy 4)")
    parser.add_argument("--finetune-max-len", type=int, help="lengths uniform in [32, this]; default 512 (toy 64)")
    parser.add_argument("--warmup", type=int, help="warm-up steps, compilation included (default 5; toy 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; toy 2)")
    parser.add_argument("--rotations", type=int, default=3, help="distinct batches used in turn")
    parser.add_argument("--corpus", nargs="+", default=[BUILTIN_CORPUS],
                        help="pre-training batches from `electra-triton pretrain`'s data pipeline on this corpus "
                        "(default: the built-in stdlib corpus)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the pipeline (default: train one on the corpus)")
    parser.add_argument("--tokenizer-docs", type=int, default=2000,
                        help="documents read to train that tokenizer (default 2000)")
    parser.add_argument("--packing", choices=("off", "on"), default="off",
                        help="the pipeline packs several examples per row, as `electra-triton pretrain --packing on` "
                        "(default off: one example per row, padded, the same batches for every backend)")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic full rows instead of the data pipeline (labelled data=synthetic in results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, help="stop starting runs after this many seconds (rest: skipped)")
    parser.add_argument("--kernels", choices=KERNEL_MODES,
                        help="electra_triton kernel mode (default: auto; toy CPU runs: reference, a smoke test of the "
                        "script, the kernels' own tests run them in the interpreter)")
    parser.add_argument("--append", action="store_true", help="add to DIR/pretrain.json instead of replacing it")
    parser.add_argument("--merge", nargs="+", type=pathlib.Path, metavar="JSON",
                        help="measure nothing: combine these pretrain.json files (one per GPU command) into DIR")
    args = parser.parse_args(argv)
    if args.merge:
        payload = merge_payloads([json.loads(path.read_text()) for path in args.merge], args.merge)
        args.out.mkdir(parents=True, exist_ok=True)
        write_results(args.out, payload, with_plot=True)
        print(f"[pretrain] merged {len(payload['runs'])} runs into {args.out / 'pretrain.json'}", flush=True)
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    toy = args.toy or device.type != "cuda"
    defaults = {"presets": ["tiny"], "seq_lens": [32, 64], "tokens_per_step": 64, "finetune_preset": "tiny",
                "finetune_batch_size": 4, "finetune_max_len": 64, "warmup": 1, "steps": 2} if toy else {
                "presets": ["small", "base", "large"], "seq_lens": [128, 512], "tokens_per_step": 16384,
                "finetune_preset": "base", "finetune_batch_size": 32, "finetune_max_len": 512, "warmup": 5,
                "steps": 20}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.kernels is None:
        args.kernels = "reference" if device.type == "cpu" else "auto"
    previous_mode = get_kernel_mode()
    set_kernel_mode(args.kernels)
    try:
        return _run(args, device, toy)
    finally:
        set_kernel_mode(previous_mode)


def _run(args: argparse.Namespace, device: torch.device, toy: bool) -> int:
    bench = Bench(device, toy=toy)
    autocast = device.type == "cuda"
    vocab_size = max(PRESETS[preset]["discriminator"]["vocab_size"] for preset in args.presets) if args.presets else 0
    data = prepare_data(None if args.synthetic or not args.presets else args.corpus, args.tokenizer,
                        args.tokenizer_docs, vocab_size, args.packing == "on")
    settings = {"device": device, "seed": args.seed, "rotations": args.rotations, "warmup": args.warmup,
                "steps": args.steps, "matmul_tflops": bench.ceilings["matmul_tflops"], "data": data,
                "min_len": min(32, args.finetune_max_len),
                # Inductor's C++ build on a 2-core CI machine takes minutes: toy CPU runs trace with dynamo only.
                "compile_backend": "inductor" if device.type == "cuda" else "eager"}
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "pretrain.json").read_text())["runs"] if args.append and (
        out / "pretrain.json").exists() else []
    payload = {**environment(), **bench.ceilings, "toy": toy,
               "settings": {"precision": "bf16 autocast, fp32 weights" if autocast else "fp32", "warmup": args.warmup,
                            "steps": args.steps, "rotations": args.rotations, "seed": args.seed,
                            "compile_backend": settings["compile_backend"], "finetune_min_len": settings["min_len"],
                            "optimizer": "the production step (electra_triton.pretrain.step): AdamW fused on CUDA, "
                            "foreach elsewhere, clip 1.0, the preset's LR schedule", "kernels": args.kernels,
                            "pretrain_data": data.label},
               "runs": previous}
    print(f"[pretrain] {device} toy={toy} ceilings: {bench.ceilings}", flush=True)
    start = time.perf_counter()
    for task, preset, seq_len, batch_size in plan(args, toy):
        for backend in args.backends:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                record = {**_record(task, preset, seq_len, batch_size, backend), "status": "skipped",
                          "reason": f"time budget of {args.budget_s:.0f} s spent"}
            else:
                record = run_one(task, preset, seq_len, batch_size, backend, settings)
            payload["runs"].append(record)
            summary = (f"{record['tokens_per_s']:.0f} tokens/s, {record['step_ms']:.1f} ms, mfu {record['mfu']:.3f}"
                       if record["status"] == "ok" else f"{record['status']}: {record['reason']}")
            print(f"[pretrain] {task} {preset} L={seq_len} B={batch_size} {backend}: {summary}", flush=True)
            write_results(out, payload, with_plot=False)
    write_results(out, payload, with_plot=True)
    print(f"[pretrain] wrote {out / 'pretrain.json'}, {out / 'pretrain.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
