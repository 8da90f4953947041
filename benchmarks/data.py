"""The pre-training data pipeline on this machine's CPU: real tokens/s and fill, from prepared shards and raw text.

    python -m benchmarks.data                    # both corpora, --max-seq-len 128 and 512, prepare with 1 and 2 workers
    python -m benchmarks.data --seconds 2 --skip-prepare-scaling
    python -m benchmarks.data --toy                 # a smoke run (CI)

Two corpora, both from local text: the built-in corpus `stdlib` (docstrings of the standard library: short
documents) and a long-document corpus (the same docstrings grouped one module per document, modules with at least
LONG_DOCUMENT_CHARS characters of them). Each is prepared once (`electra-triton prepare`, one tokenizer trained on
the built-in corpus), then for each max_seq_len:

    shards     `pretrain --data`: ShardExampleStream -> Batcher, what the training loop's prefetch thread runs
    raw text   `pretrain --corpus`: ExampleStream (tokenizing on the fly) -> Batcher

both with packing (the default) and without. Reported: real tokens/s (tokens that are not padding, per process, one
thread, the batch's unpad plan included) and fill (real tokens / slots). `prepare` is timed with 1 and 2 worker
processes on copies of the long-document corpus (the tokenizer given, so only reading and tokenizing are timed).

These are CPU measurements of a loader, taken as printed; the machine's other load is not controlled here.
"""

import argparse
import json
import pathlib
import resource
import sys
import sysconfig
import tempfile
import time
from typing import Any

import torch

from electra_triton.pretrain.data import ExampleStream, module_docstrings, resolve_corpus
from electra_triton.pretrain.packing import Batcher
from electra_triton.pretrain.prepare import prepare
from electra_triton.pretrain.shards import ShardExampleStream, open_dataset

LONG_DOCUMENT_CHARS = 2000
BATCH_SIZE = 64


def write_docstring_corpus(path: pathlib.Path, grouped: bool = True, files: int | None = None) -> int:
    """A text corpus from the standard library's docstrings, paragraphs as lines. grouped: one document per module
    (modules with at least LONG_DOCUMENT_CHARS characters of docstrings: long documents); else one per docstring
    (the built-in corpus as text). files: the first N modules only. Returns the document count."""
    documents = []
    for _, file in resolve_corpus(["stdlib"])[:files]:
        docs = [[" ".join(p.split()) for p in doc.split("\n\n")] for doc in module_docstrings(file)]
        docs = [[p for p in doc if p] for doc in docs]
        if grouped:
            text = "\n".join(p for doc in docs for p in doc)
            documents += [text] if len(text) >= LONG_DOCUMENT_CHARS else []
        else:
            documents += ["\n".join(doc) for doc in docs if doc]
    path.write_text("\n\n".join(documents) + "\n")
    return len(documents)


def measure(batcher: Batcher, seconds: float) -> dict[str, float]:
    """Real tokens per second of wall time and per second of this thread's CPU time (on a shared machine the wall
    rate falls with the other load; the CPU rate is what the loader costs), and fill."""
    batcher.next_batch(BATCH_SIZE)  # warm: fills the shuffle buffer and the packing pool
    real = slots = 0
    started, cpu_started = time.perf_counter(), time.thread_time()
    while (elapsed := time.perf_counter() - started) < seconds:
        mask = batcher.next_batch(BATCH_SIZE)["attention_mask"]
        real += int(mask.sum())
        slots += mask.numel()
    cpu = time.thread_time() - cpu_started
    return {"real_tokens_per_s": real / elapsed, "real_tokens_per_cpu_s": real / cpu, "fill": real / slots}


def loader_rows(name: str, folder: pathlib.Path, sources, seconds: float) -> list[dict[str, Any]]:
    data = open_dataset(folder)
    tokenizer = data.tokenizer
    rows = []
    for max_seq_len in (128, 512):
        for source in ("shards", "raw text"):
            for packing in (True, False):
                stream = ShardExampleStream(data, max_seq_len) if source == "shards" else \
                    ExampleStream(sources, tokenizer, max_seq_len)
                batcher = Batcher(stream, max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                  tokenizer.pad_token_id, packing=packing, plan=True)
                row = {"corpus": name, "max_seq_len": max_seq_len, "source": source, "packing": packing,
                       **measure(batcher, seconds)}
                print(f"{name:14} L={max_seq_len:<4} {source:8} packing {'on ' if packing else 'off'}  "
                      f"{row['real_tokens_per_s']:>11,.0f} real tokens/s  {row['real_tokens_per_cpu_s']:>11,.0f} per "
                      f"CPU-second  fill {row['fill']:.1%}", flush=True)
                rows.append(row)
    return rows


def prepare_scaling(corpus: pathlib.Path, copies: int, tokenizer: str, work: pathlib.Path, runs: int
                    ) -> dict[str, Any]:
    """prepare (the tokenizer given: reading and tokenizing only) with 1 and 2 workers, on `copies` copies of the
    long-document corpus, runs alternating: wall seconds, and CPU seconds of this process and of its workers.

    On a machine shared with other work the wall-time ratio says little; the CPU accounting gives the PROJECTED
    2-core speedup: the 1-worker CPU time over the larger of the coordinating process's CPU time and half the
    workers' (startup and imbalance left out)."""
    scaled = work / "scaling-corpus.txt"
    scaled.write_text(corpus.read_text() * copies)
    runs_by_workers: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(runs):
        for workers in (1, 2):
            before_self, before_children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                                                resource.RUSAGE_CHILDREN))
            started = time.perf_counter()
            prepare([str(scaled)], str(work / f"scaling-{workers}"), tokenizer=tokenizer, workers=workers,
                    overwrite=True, progress=False)
            after_self, after_children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                                              resource.RUSAGE_CHILDREN))
            runs_by_workers[workers].append({
                "wall": time.perf_counter() - started,
                "cpu_self": after_self.ru_utime + after_self.ru_stime - before_self.ru_utime - before_self.ru_stime,
                "cpu_workers": after_children.ru_utime + after_children.ru_stime - before_children.ru_utime
                - before_children.ru_stime})
    median = {workers: {key: sorted(run[key] for run in values)[len(values) // 2] for key in values[0]}
              for workers, values in runs_by_workers.items()}
    tokens = json.loads((work / "scaling-1" / "manifest.json").read_text())["tokens"]
    one, two = median[1], median[2]
    projected = (one["cpu_self"] + one["cpu_workers"]) / max(two["cpu_self"], two["cpu_workers"] / 2)
    result = {"corpus_mb": scaled.stat().st_size / 1e6, "tokens": tokens, "runs": runs, "one_worker": one,
              "two_workers": two, "wall_speedup": one["wall"] / two["wall"], "projected_speedup": projected}
    print(f"prepare ({result['corpus_mb']:.1f} MB, {tokens:,} tokens, tokenizer given), median of {runs}:\n"
          f"  1 worker : {one['wall']:.2f} s wall ({tokens / one['wall']:,.0f} tokens/s), CPU {one['cpu_self']:.2f} s\n"
          f"  2 workers: {two['wall']:.2f} s wall ({tokens / two['wall']:,.0f} tokens/s), CPU {two['cpu_self']:.2f} s "
          f"coordinating + {two['cpu_workers']:.2f} s in workers\n"
          f"  speedup: {result['wall_speedup']:.2f}x wall on this machine as loaded now; PROJECTED on 2 idle cores "
          f"from the CPU accounting: {projected:.2f}x", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per loader measurement")
    parser.add_argument("--work", help="folder for the corpora and prepared data (default: a temporary one)")
    parser.add_argument("--out", help="write the results as JSON into this folder (data.json)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--scaling-runs", type=int, default=3)
    parser.add_argument("--scaling-copies", type=int, default=24, help="copies of the long-document corpus that "
                        "prepare tokenizes in the worker-scaling measurement")
    parser.add_argument("--skip-prepare-scaling", action="store_true")
    parser.add_argument("--toy", action="store_true", help="a smoke run: 40 standard-library modules, short timings")
    args = parser.parse_args(argv)
    if args.toy:
        args.seconds, args.scaling_runs, args.scaling_copies, args.vocab_size = 0.2, 1, 2, 500
    # The loader is one thread of the training process: its rate per process, not the machine's.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        work = pathlib.Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        long_corpus = work / "long-documents.txt"
        count = write_docstring_corpus(long_corpus, files=40 if args.toy else None)
        print(f"long-document corpus: {count} documents, {long_corpus.stat().st_size / 1e6:.1f} MB", flush=True)
        builtin = ["stdlib"]
        if args.toy:
            write_docstring_corpus(work / "stdlib.txt", grouped=False, files=40)
            builtin = [str(work / "stdlib.txt")]
        prepare(builtin, str(work / "stdlib"), vocab_size=args.vocab_size, overwrite=True, progress=False)
        tokenizer = str(work / "stdlib" / "tokenizer")
        prepare([str(long_corpus)], str(work / "long"), tokenizer=tokenizer, overwrite=True, progress=False)
        rows = loader_rows("stdlib", work / "stdlib", resolve_corpus(builtin), args.seconds)
        rows += loader_rows("long documents", work / "long", resolve_corpus([str(long_corpus)]), args.seconds)
        scaling = None if args.skip_prepare_scaling else \
            prepare_scaling(long_corpus, args.scaling_copies, tokenizer, work, args.scaling_runs)
    result = {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"], "toy": args.toy,
              "batch_size": BATCH_SIZE, "long_documents": count, "loader": rows, "prepare_scaling": scaling}
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
