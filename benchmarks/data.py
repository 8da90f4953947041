"""The pre-training data pipeline on this machine's CPU: real tokens/s and fill, from prepared shards and raw text.

    python -m benchmarks.data                    # both corpora, --max-seq-len 128 and 512, prepare with 1 and 2 workers
    python -m benchmarks.data --seconds 2 --skip-prepare-scaling

Two corpora, both from local text: the built-in corpus `stdlib` (docstrings of the standard library: short
documents) and a long-document corpus (the same docstrings grouped one module per document, modules with at least
LONG_DOCUMENT_CHARS characters of them). Each is prepared once (`electra-triton prepare`, one tokenizer trained on
the built-in corpus), then for each max_seq_len:

    shards     `pretrain --data`: ShardExampleStream -> Batcher, what the training loop's prefetch thread runs
    raw text   `pretrain --corpus`: ExampleStream (tokenizing on the fly) -> Batcher

both with packing (the default with the kernels) and without. Reported: real tokens/s (tokens that are not padding,
per process, one thread, the batch's unpad plan included) and fill (real tokens / slots). `prepare` is timed with 1
and 2 worker processes on the long-document corpus (the tokenizer given, so only tokenization is timed).

These are CPU measurements of a loader, taken as printed; the machine's other load is not controlled here.
"""

import argparse
import ast
import json
import pathlib
import sys
import sysconfig
import tempfile
import time
from typing import Any

from electra_triton.pretrain.data import ExampleStream, resolve_corpus
from electra_triton.pretrain.packing import Batcher
from electra_triton.pretrain.prepare import prepare
from electra_triton.pretrain.shards import ShardExampleStream, open_dataset

LONG_DOCUMENT_CHARS = 2000
BATCH_SIZE = 64


def write_long_document_corpus(path: pathlib.Path) -> int:
    """A text corpus of long documents: each standard-library module's docstrings, paragraphs as lines, one document
    per module (modules with at least LONG_DOCUMENT_CHARS characters of docstrings). Returns the document count."""
    documents = []
    for _, file in resolve_corpus(["stdlib"]):
        try:
            tree = ast.parse(pathlib.Path(file).read_bytes())
        except (SyntaxError, ValueError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        paragraphs = [" ".join(p.split()) for doc in docs if doc for p in doc.split("\n\n")]
        text = "\n".join(p for p in paragraphs if p)
        if len(text) >= LONG_DOCUMENT_CHARS:
            documents.append(text)
    path.write_text("\n\n".join(documents) + "\n")
    return len(documents)


def measure(batcher: Batcher, seconds: float) -> dict[str, float]:
    batcher.next_batch(BATCH_SIZE)  # warm: fills the shuffle buffer and the packing pool
    real = slots = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        mask = batcher.next_batch(BATCH_SIZE)["attention_mask"]
        real += int(mask.sum())
        slots += mask.numel()
    return {"real_tokens_per_s": real / elapsed, "fill": real / slots}


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
                      f"{row['real_tokens_per_s']:>12,.0f} real tokens/s   fill {row['fill']:.1%}", flush=True)
                rows.append(row)
    return rows


def prepare_scaling(corpus: str, tokenizer: str, work: pathlib.Path, runs: int) -> dict[str, Any]:
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(runs):
        for workers in (1, 2):
            started = time.perf_counter()
            prepare([corpus], str(work / f"scaling-{workers}"), tokenizer=tokenizer, workers=workers, overwrite=True,
                    progress=False)
            times[workers].append(time.perf_counter() - started)
    best = {workers: sorted(values)[len(values) // 2] for workers, values in times.items()}
    result = {"seconds_1_worker": best[1], "seconds_2_workers": best[2], "speedup": best[1] / best[2],
              "runs": runs}
    print(f"prepare (long documents, tokenizer given): 1 worker {best[1]:.2f} s, 2 workers {best[2]:.2f} s (median "
          f"of {runs}): {result['speedup']:.2f}x", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per loader measurement")
    parser.add_argument("--work", help="folder for the corpora and prepared data (default: a temporary one)")
    parser.add_argument("--out", help="write the results as JSON into this folder (data.json)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--scaling-runs", type=int, default=3)
    parser.add_argument("--skip-prepare-scaling", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        work = pathlib.Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        long_corpus = work / "long-documents.txt"
        count = write_long_document_corpus(long_corpus)
        print(f"long-document corpus: {count} documents, {long_corpus.stat().st_size / 1e6:.1f} MB", flush=True)
        prepare(["stdlib"], str(work / "stdlib"), vocab_size=args.vocab_size, overwrite=True, progress=False)
        tokenizer = str(work / "stdlib" / "tokenizer")
        prepare([str(long_corpus)], str(work / "long"), tokenizer=tokenizer, overwrite=True, progress=False)
        rows = loader_rows("stdlib", work / "stdlib", resolve_corpus(["stdlib"]), args.seconds)
        rows += loader_rows("long documents", work / "long", resolve_corpus([str(long_corpus)]), args.seconds)
        scaling = None if args.skip_prepare_scaling else \
            prepare_scaling(str(long_corpus), tokenizer, work, args.scaling_runs)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps({"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()[
            "stdlib"], "batch_size": BATCH_SIZE, "loader": rows, "prepare_scaling": scaling}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
