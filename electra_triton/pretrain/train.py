"""The training loop of `electra-triton pretrain`: single process, torchrun DDP, or FSDP2; checkpoints and resume."""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import electra_triton

from ..ops import _dispatch
from . import checkpoint as ckpt
from . import distributed, plots
from .config import PretrainConfig, explicit_flags, parse_args
from .data import (
    CorpusError,
    ExampleStream,
    Prefetcher,
    check_tokenizer,
    count_documents,
    load_tokenizer,
    resolve_corpus,
    special_ids,
    train_tokenizer,
)
from .distributed import RunError, Runtime, init_runtime
from .evaluate import EvalPlan, Evaluator, plan_evaluation
from .metrics import EVAL_KEYS, MetricsLog, tensorboard_writer
from .model import ElectraPretrainer, accepts_unpad_plan, build_models, flops_per_token, peak_flops
from .packing import Batcher
from .shards import DataError, ShardExampleStream, open_dataset
from .step import TrainStep, autocast_for, build_optimizer, build_scheduler

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"


def select_kernels(cfg: PretrainConfig, device: torch.device, say) -> bool:
    """Set the ops' kernel mode; True when the models should be patched with the fused kernels."""
    if cfg.kernels == "reference":
        _dispatch.set_kernel_mode("reference")
        say("kernels: PyTorch reference ops (--kernels reference)")
        return False
    if device.type != "cuda" and not _dispatch.INTERPRET:
        if cfg.kernels == "triton":
            raise RunError("--kernels triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels in Triton's "
                           "interpreter, very slowly): use --kernels auto or reference on this machine")
        _dispatch.set_kernel_mode("reference")
        say("kernels: no GPU here, using the PyTorch reference ops (--kernels auto); the Triton kernels run on CUDA")
        return False
    _dispatch.set_kernel_mode(cfg.kernels)
    where = "compiled for " + torch.cuda.get_device_name(device) if device.type == "cuda" else "Triton interpreter"
    say(f"kernels: Triton ({where})")
    return True


def check_output_dir(cfg: PretrainConfig) -> None:
    out = pathlib.Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out} is a file: choose a folder")
    if cfg.resume:
        return
    previous = ckpt.list_checkpoints(out)
    if previous or (out / METRICS).exists():
        what = f"{len(previous)} checkpoint(s) up to {previous[-1].name}" if previous else "a metrics.jsonl"
        raise RunError(
            f"--output-dir {out} already holds another run ({what}). Pass --resume to continue it, or choose "
            "another --output-dir (or delete that one) to start afresh; nothing was overwritten"
        )


def prepare_tokenizer(cfg: PretrainConfig, runtime: Runtime, sources, say):
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    folder = pathlib.Path(cfg.output_dir) / "tokenizer"
    if cfg.resume and folder.is_dir():
        return load_tokenizer(str(folder))
    error = None
    if runtime.main:
        say(f"tokenizer: training a {cfg.vocab_size}-token WordPiece vocab on the corpus (--tokenizer DIR to use "
            "your own)")
        try:
            tokenizer = train_tokenizer(sources, cfg.vocab_size, cfg.tokenizer_train_docs, cfg.max_seq_len)
            tmp = folder.with_name("tokenizer.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except (CorpusError, OSError) as caught:
            error = caught
    if runtime.distributed:
        status = [None if error is None else str(error)]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None and error is None:
            error = CorpusError(status[0])
    if error is not None:
        raise error
    return tokenizer if runtime.main else load_tokenizer(str(folder))


def choose_packing(cfg: PretrainConfig, use_kernels: bool, plan: bool, say) -> bool:
    """--packing auto: on, except with kernels whose encoder takes no unpad_plan: their fused attention reads a 4D
    mask as a key-padding mask, so a block-diagonal one cannot keep packed examples apart there."""
    if cfg.packing == "off":
        say("packing: off, one example per row (--packing off)")
        return False
    if use_kernels and not plan:
        if cfg.packing == "on":
            raise RunError("--packing on: these kernels' encoder takes no unpad_plan, so packed examples could not be "
                           "kept apart; use --packing off (or auto), or --kernels reference")
        say("packing: off: the kernels' encoder takes no unpad_plan here (--packing auto)")
        return False
    how = "cu_seqlens through the encoder's unpad_plan" if plan else "a block-diagonal attention mask"
    say(f"packing: on, several examples per row of {cfg.max_seq_len}, each attending to itself ({how})")
    return True


def shard_model(model: ElectraPretrainer) -> torch.nn.Module:
    """FSDP2: one unit per transformer layer of both models, the rest (shared embeddings, heads) in the root unit."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for electra in (model.generator.electra, model.discriminator.electra):
        for layer in electra.encoder.layer:
            fully_shard(layer)
    fully_shard(model)
    return model


class Trainer:
    def __init__(self, cfg: PretrainConfig, runtime: Runtime):
        self.cfg = cfg
        self.rt = runtime
        self.out = pathlib.Path(cfg.output_dir)
        self.stop_signal: int | None = None

    def say(self, text: str) -> None:
        if self.rt.main:
            tqdm.write(text, file=sys.stderr)

    # ---------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        check_output_dir(cfg)
        if cfg.report_to == "tensorboard":
            try:
                tensorboard_writer()
            except ValueError as error:
                raise RunError(str(error)) from error
        if cfg.resume:
            distributed.check_resume_world_size(self.out, rt.world_size)
        if cfg.data:
            dataset = open_dataset(cfg.data, load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None)
        else:
            sources = resolve_corpus(cfg.corpus)
            distributed.check_enough_documents(sources, rt.world_size)
        use_kernels = select_kernels(cfg, rt.device, self.say)
        if rt.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_CONFIG).write_text(json.dumps(cfg.to_json(), indent=1))
        distributed.check_shared_output(rt, self.out)
        self.tokenizer = dataset.tokenizer if cfg.data else prepare_tokenizer(cfg, rt, sources, self.say)
        check_tokenizer(self.tokenizer, cfg.tokenizer or str(self.out / "tokenizer"))

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        generator, discriminator = build_models(cfg.model_config("discriminator"), cfg.model_config("generator"),
                                                self.tokenizer)
        self.configs = (generator.config, discriminator.config)
        if use_kernels:
            electra_triton.patch(generator)
            electra_triton.patch(discriminator)
        plan = use_kernels and accepts_unpad_plan(generator)
        packing = choose_packing(cfg, use_kernels, plan, self.say)
        self.model = ElectraPretrainer(
            generator, discriminator, special_ids(self.tokenizer), self.tokenizer.mask_token_id, cfg.mask_prob,
            cfg.mask_token_prob, cfg.random_token_prob, cfg.rtd_weight, cfg.temperature, cfg.max_seq_len, packing,
        ).to(rt.device)
        eval_plan = plan_evaluation(
            cfg.eval_docs, cfg.eval_corpus,
            (lambda limit: min(dataset.num_documents, limit)) if cfg.data else
            (lambda limit: count_documents(sources, limit)), self.say)
        held_out = eval_plan.train_held_out
        if cfg.data:
            stream = ShardExampleStream(dataset, cfg.max_seq_len, cfg.seed, rt.rank, rt.world_size, cfg.shuffle_buffer,
                                        held_out_docs=held_out)
        else:
            stream = ExampleStream(sources, self.tokenizer, cfg.max_seq_len, cfg.seed, rt.rank, rt.world_size,
                                   cfg.shuffle_buffer, held_out_docs=held_out)
        self.stream = Batcher(stream, cfg.max_seq_len, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id,
                              self.tokenizer.pad_token_id, packing, cfg.mask_prob, plan=plan)
        self.evaluator = self._build_evaluator(eval_plan, dataset if cfg.data else None, sources if not cfg.data
                                               else None, plan)
        if not plots.available():
            self.say("plots: matplotlib is not installed, so no PNGs under plots/ (pip install matplotlib)")
        self.step = 0
        state = None
        if cfg.resume:
            found = ckpt.newest_valid_checkpoint(self.out, report=self.say)
            if found is None:
                self.say(f"resume: no valid checkpoint in {self.out / 'checkpoints'}, starting from step 0")
            else:
                self.say(f"resume: continuing from {found}")
                state = ckpt.load_checkpoint(found, "state")
                if state["world_size"] != rt.world_size:
                    raise RunError(f"{found} was written by {state['world_size']} processes, this run has "
                                   f"{rt.world_size}: resume with the same number of processes")
                model_state = ckpt.load_checkpoint(found, "model")
                optimizer_state = ckpt.load_checkpoint(found, "optimizer")
                if not cfg.fsdp:
                    self.model.load_state_dict(model_state)

        if cfg.fsdp:
            self.wrapped = shard_model(self.model)
        elif rt.distributed:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        else:
            self.wrapped = self.model
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                         cfg.adam_eps, rt.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps)
        if state is not None:
            if cfg.fsdp:
                distributed.load_full_state(self.model, self.optimizer, model_state, optimizer_state)
            else:
                self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = state["step"]
            self.stream.load_state_dict(state["data"][rt.rank])
            rng = state["rng"][rt.rank]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and rt.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], rt.device)
            self._truncate_metrics()
        else:
            # Masking, sampling and dropout differ per rank; the weights were initialised identically above.
            torch.manual_seed(cfg.seed * 1000 + 1 + rt.rank)
        self.autocast = autocast_for(rt.device, cfg.precision)
        self.train_step = TrainStep(self.wrapped, self.optimizer, self.scheduler, max_grad_norm=cfg.max_grad_norm,
                                    autocast=self.autocast,
                                    parameters=self.model.parameters())
        gen_cfg, disc_cfg = self.configs
        self.flops_per_token = flops_per_token(disc_cfg, gen_cfg, cfg.max_seq_len, cfg.mask_prob)
        self.peak = peak_flops(rt.device)

    def _build_evaluator(self, eval_plan: EvalPlan, dataset, sources, unpad: bool) -> Evaluator | None:
        cfg, rt = self.cfg, self.rt
        if eval_plan.docs == 0:
            return None
        split = {"held_out_docs": eval_plan.docs, "split": "eval"}
        if eval_plan.eval_sources is not None:
            stream = ExampleStream(eval_plan.eval_sources, self.tokenizer, cfg.max_seq_len, cfg.seed, rt.rank,
                                   rt.world_size, **split)
        elif dataset is not None:
            stream = ShardExampleStream(dataset, cfg.max_seq_len, cfg.seed, rt.rank, rt.world_size, 1, **split)
        else:
            stream = ExampleStream(sources, self.tokenizer, cfg.max_seq_len, cfg.seed, rt.rank, rt.world_size, **split)
        # One example per row: evaluation needs no packing, and its batches are built once.
        batcher = Batcher(stream, cfg.max_seq_len, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id,
                          self.tokenizer.pad_token_id, False, cfg.mask_prob, plan=unpad)
        evaluator = Evaluator.build(stream, batcher, cfg.batch_size, cfg.max_seq_len, len(self.tokenizer), cfg.seed,
                                    rt.device, rt.distributed)
        where = "of --eval-corpus" if cfg.eval_corpus else "held out of the training data, never trained on"
        if evaluator is None:
            self.say(f"evaluation is off: the {eval_plan.docs} documents {where} hold no text")
        else:
            self.say(f"evaluation: every {cfg.eval_every} steps and at the end, on the first {eval_plan.docs} "
                     f"documents {where} ({evaluator.num_examples} examples" + (" on rank 0)" if rt.distributed
                                                                                else ")"))
        return evaluator

    def evaluate(self) -> dict[str, Any]:
        """The held-out metrics now, as a metrics.jsonl row; also remembers the unigram baseline."""
        totals = self.evaluator.evaluate(self.model, self.autocast)
        self.unigram_accuracy = totals.unigram_accuracy()
        return {"step": self.step, "split": "eval", **totals.metrics()}

    def plot(self) -> None:
        """PNGs of the run so far under OUTPUT_DIR/plots (nothing without matplotlib; said once at setup)."""
        if self.rt.main and plots.available():
            plots.write_run_plots(self.out)

    def _truncate_metrics(self) -> None:
        path = self.out / METRICS
        if not self.rt.main or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------------------------------------------- saving
    def _gather(self, obj: Any) -> list[Any]:
        if not self.rt.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.rt.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model and optimizer state as one process would hold them (collective under FSDP)."""
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict(), self.optimizer.state_dict()

    def save_checkpoint(self) -> pathlib.Path | None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.rt.device) if self.rt.device.type == "cuda" else None}
        rngs = self._gather(rng)
        data = self._gather(self.data.state_dict())
        model_state, optimizer_state = self.full_state()
        path = None
        if self.rt.main:
            state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng": rngs, "data": data,
                     "world_size": self.rt.world_size, "config": self.cfg.to_json()}
            path = ckpt.save_checkpoint(self.out, self.step, {"model": model_state, "optimizer": optimizer_state,
                                                              "state": state}, self.cfg.keep_checkpoints)
        self.rt.barrier()
        return path

    def save_final(self) -> None:
        from transformers import ElectraForMaskedLM, ElectraForPreTraining

        model_state, _ = self.full_state() if self.cfg.fsdp else (self.model.state_dict(), None)
        if self.rt.main:
            gen_cfg, disc_cfg = self.configs
            for name, cls, config in (("generator", ElectraForMaskedLM, gen_cfg),
                                      ("discriminator", ElectraForPreTraining, disc_cfg)):
                # A fresh, unpatched HF model: the saved folder is exactly what plain transformers loads.
                model = cls(config)
                prefix = name + "."
                model.load_state_dict({k[len(prefix):]: v.detach().cpu() for k, v in model_state.items()
                                       if k.startswith(prefix)})
                tmp = self.out / f"{name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                shutil.rmtree(self.out / name, ignore_errors=True)
                os.replace(tmp, self.out / name)
        self.rt.barrier()

    # ---------------------------------------------------------------------------------------------------- loop
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once
        self.say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)")

    def _should_stop(self) -> bool:
        if not self.rt.distributed:
            return self.stop_signal is not None
        # Every rank must stop at the same step. The check synchronises the GPU, so under NCCL it runs every few
        # steps only (a signal is honoured within 10 steps).
        if self.rt.device.type == "cuda" and self.step % 10 and self.step != self.cfg.max_steps:
            return False
        flag = torch.tensor([self.stop_signal or 0], device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_signal = int(flag.item()) or None
        return self.stop_signal is not None

    def train(self) -> int:
        handlers = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                handlers[signum] = signal.signal(signum, self._on_signal)
        self.data = Prefetcher(self.stream, self.cfg.batch_size)
        try:
            return self._loop()
        finally:
            self.data.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _loop(self) -> int:
        cfg, rt = self.cfg, self.rt
        self.wrapped.train()
        slots_per_step = cfg.batch_size * cfg.max_seq_len * cfg.grad_accum * rt.world_size
        run_tokens = run_slots = 0.0  # real tokens and row slots of the logged steps, for the summary
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not rt.main, unit="step", dynamic_ncols=True,
                   desc="pretrain")
        metrics_log = MetricsLog(self.out / METRICS, self.out / "tensorboard" if cfg.report_to == "tensorboard"
                                 else None, self.step) if rt.main else None
        started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
        first_step, last, last_eval, run_seconds = self.step, {}, {}, 0.0
        try:
            while self.step < cfg.max_steps:
                lr = self.scheduler.get_last_lr()[0]
                self.train_step([self.data.next_batch() for _ in range(cfg.grad_accum)])
                self.step += 1
                window_steps += 1
                bar.update(1)

                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    values = self.train_step.read_metrics()  # the loop's one host sync, on logging steps only
                    micro_steps = values["micro_steps"]
                    elapsed = time.perf_counter() - window_start
                    # Real tokens only (rtd_count counts the tokens that are not padding): packed or not, honest.
                    tokens_per_s = values["rtd_count"] / max(elapsed, 1e-9)
                    fill = values["rtd_count"] / (slots_per_step * window_steps)
                    run_tokens += values["rtd_count"]
                    run_slots += slots_per_step * window_steps
                    run_seconds += elapsed
                    last = {
                        "step": self.step,
                        "split": "train",
                        "loss": values["loss"] / micro_steps,
                        "mlm_loss": values["mlm_loss"] / micro_steps,
                        "rtd_loss": values["rtd_loss"] / micro_steps,
                        "mlm_acc": values["mlm_correct"] / max(values["mlm_count"], 1),
                        "rtd_acc": values["rtd_correct"] / max(values["rtd_count"], 1),
                        "grad_norm": values["grad_norm"],
                        "lr": lr,
                        "tokens_per_s": tokens_per_s,
                        "fill": fill,
                    }
                    postfix = {"loss": f"{last['loss']:.3f}", "mlm_acc": f"{last['mlm_acc']:.3f}",
                               "rtd_acc": f"{last['rtd_acc']:.3f}", "tok/s": f"{tokens_per_s:,.0f}",
                               "fill": f"{fill:.0%}"}
                    if self.peak:
                        last["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * rt.world_size)
                        postfix["mfu"] = f"{last['mfu']:.1%}"
                    bar.set_postfix(postfix, refresh=False)
                    if metrics_log:
                        metrics_log.write(last)
                    window_start, window_steps = time.perf_counter(), 0

                if self.evaluator and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    last_eval = self.evaluate()
                    if metrics_log:
                        metrics_log.write(last_eval)
                    self.say(f"eval step {self.step}: " + ", ".join(f"{key} {last_eval[key]:.3f}" for key in EVAL_KEYS))
                    window_start = time.perf_counter()  # throughput counts training only

                stop = self._should_stop()
                if stop:
                    path = self.save_checkpoint()
                    bar.close()
                    self.say(f"stopped at step {self.step}; checkpoint saved to {path}.\nContinue with: "
                             f"electra-triton pretrain --output-dir {self.out} --resume")
                    return 128 + self.stop_signal
                if self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
                    self.plot()
            bar.close()
            self.save_checkpoint()
            self.save_final()
        finally:
            bar.close()
            if metrics_log:
                metrics_log.close()
        self.plot()
        if rt.main:
            out = self.out.resolve()
            minutes, seconds = divmod(time.perf_counter() - started, 60)
            summary = f"loss {last['loss']:.3f}, MLM acc {last['mlm_acc']:.3f}, RTD acc {last['rtd_acc']:.3f}, " \
                f"{run_tokens / max(run_seconds, 1e-9):,.0f} real tokens/s, fill {run_tokens / run_slots:.1%}" \
                if last else "no step taken"
            held_out = ""
            if last_eval:
                times_baseline = last_eval["mlm_accuracy"] / max(self.unigram_accuracy, 1e-9)
                held_out = (
                    f"  held-out eval  disc_auc {last_eval['disc_auc']:.3f}, disc precision "
                    f"{last_eval['disc_precision']:.3f}, recall {last_eval['disc_recall']:.3f}; mlm_accuracy "
                    f"{last_eval['mlm_accuracy']:.3f} = {times_baseline:.1f}x the unigram baseline "
                    f"{self.unigram_accuracy:.3f} (always predicting the most frequent masked token)\n"
                )
            print(
                f"\ndone: steps {first_step} -> {self.step} in {int(minutes)}m{seconds:.0f}s ({summary})\n{held_out}"
                f"  discriminator  {out / 'discriminator'}   (ElectraForPreTraining.from_pretrained)\n"
                f"  generator      {out / 'generator'}   (ElectraForMaskedLM.from_pretrained)\n"
                f"  metrics        {out / METRICS}   (plots: {out / 'plots'}; compare runs: electra-triton plot)\n"
                f"  checkpoints    {out / 'checkpoints'}   (continue with --resume and a larger --max-steps)"
            )
        return 0


def run(cfg: PretrainConfig) -> int:
    """Train as configured; returns the exit code (0, or 128 + signal when interrupted)."""
    cfg = cfg.resolved()
    runtime = init_runtime(cfg)
    with distributed.failure_propagation(runtime):
        trainer = Trainer(cfg, runtime)
        trainer.setup()
        return trainer.train()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = explicit_flags(argv)
        saved = None
        if flags.get("resume"):
            output_dir = flags.get("output_dir") or PretrainConfig(preset=flags.get("preset", "tiny")).resolved()\
                .output_dir
            path = pathlib.Path(output_dir) / RUN_CONFIG
            if path.exists():
                saved = json.loads(path.read_text())
                saved["resume"] = True
        return run(parse_args(argv, saved))
    except (RunError, CorpusError, DataError, ValueError) as error:
        print(f"electra-triton pretrain: error: {error}", file=sys.stderr)
        return 2
