"""GPU evidence in one command: correctness, kernel headline cases and the end-to-end step, within a time budget.

    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BENCH_COMMIT=<commit sent>
    timeout 400 python -m benchmarks.gpu --out "$OUT" --budget-s 330 2>&1 | tee "$OUT/console.log"
    python -m benchmarks.gpu --list                                   # the parts and their cost estimates
    python -m benchmarks.gpu --out DIR --parts correctness kernels/attention

Parts, in order of value (runner.PARTS, one line each with its estimate):

(a) correctness/*: every op in bf16 and fp16 against float64 under the 2x rule (electra_triton.accuracy): attention
    with a key mask, with dropout through the kernel's keep-mask, varlen; gelu_linear; dropout_add_layer_norm with
    the kernel's dropout mask; rtd_loss; mlm_loss and the fused generator head. Then ELECTRA-base discriminator and
    generator, patched, against stock transformers under bf16 autocast (loss, logits, every gradient); then
    torch.compile(fullgraph=True, inductor) of a patched model (checks.py).
(b) kernels/*: attention L=512 (and 128) D=64 mask + dropout against each SDPA backend, varlen against the padded
    impls, gelu_linear on the FFN shapes against cuBLAS + GELU, LayerNorm and rtd_loss against the copy bandwidth,
    through benchmarks/<op>.py (rows as benchmarks.kernels writes them).
(c) e2e/*: the pre-training step at base/512 for hf-sdpa and electra-triton, the fine-tuning step, issue 18's
    single-GPU torchrun with the kernels on (plain, and --fsdp, the only way one process meets NCCL), then the
    -compile backends, through benchmarks.pretrain (runs as it writes them).
(d) projection/anatomy: the step anatomy's PROJECTED step time beside each measured pre-training step.

Afterwards, `python -m benchmarks.gpu --notes DIR` reads DIR/evidence.json and writes DIR/NOTES.md: every speed target
of the open issues (targets.py), the value measured, met or not; and prints the README results table's rows.

The budget. A part starts only when its estimate fits in what is left of --budget-s; a part still running at the
deadline is interrupted (SIGALRM in the main process, the process group of a subprocess) and recorded as failed, so
the command ends by the deadline and DIR/evidence.json, rewritten after every part, holds everything measured. A part
that fails is recorded with its traceback in DIR/evidence.log and the next one runs. On CPU every part runs at toy
size (TOY in every output) with toy estimates; the test suite runs it so.

The compile plan (Triton compiles each kernel variant on first launch, ~1-3 s each, inductor a minute or more per
training graph; on a cold machine that is most of the 8 minutes):
1. Worker phase (CUDA; --workers, default min(8, CPUs / 2)): the checks run in parallel worker processes, and beside
   them warm-ups of every timed part that compiles: the same benchmark code run once through a Bench that times
   nothing (context.WarmBench), the end-to-end parts for two steps, one after another in one worker (device memory).
   They fill Triton's on-disk cache (~/.triton/cache or TRITON_CACHE_DIR) and inductor's FX-graph and autotuning
   caches, which the main process then hits. The phase ends when the checks and the warm-ups are done (not waiting
   for the -compile backends', which the budget rarely reaches) or at --worker-share of the budget; a part whose
   warm-up finished has its compile share taken off its estimate.
2. Serial phase (main process, alone on the device): the timed parts in order of value, each timing a warm cache.
   A warm Triton cache carried from elsewhere (TRITON_CACHE_DIR) helps only if its keys match the device machine's
   triton, CUDA and driver; benchmarks/README.md says how to check that in the first call.
"""
