"""`electra-triton prepare`: tokenize a corpus once, with every core, into memory-mapped shards (see shards.py).

The corpus is cut into work units that depend on the input only (a .py file of the built-in corpus; a byte range of
~UNIT_BYTES of a text or jsonl file, cut after a document's end), tokenized by a pool of processes and written in
unit order: the output is the same bytes whatever the number of workers. Everything is written into a hidden
sibling folder that becomes the output folder (a rename) only once the manifest is in it: an interrupted run leaves
no half dataset that looks finished.
"""

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .config import BUILTIN_CORPUS, PRESETS
from .data import (
    CorpusError,
    _describe,
    jsonl_sentences,
    load_tokenizer,
    module_docstrings,
    resolve_corpus,
    train_tokenizer,
)
from .shards import (
    FILE_KINDS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_DIR,
    file_sha256,
    shard_file,
    token_dtype,
    tokenizer_fingerprint,
)

UNIT_BYTES = 1 << 22  # text read and tokenized as one piece of work, at most
MIN_UNIT_BYTES = 1 << 16  # and at least: units of a small corpus are 1/64 of it, so that every worker gets some
SHARD_TOKENS = 1 << 27  # a shard closes at the first unit boundary past this many tokens

Unit = tuple[str, str, int, int]  # kind, path, start byte, end byte (a whole .py file for kind "pydoc")


def work_units(sources: list[tuple[str, str]], unit_bytes: int | None = None) -> list[Unit]:
    """The corpus cut into units of ~unit_bytes (default: from the corpus size alone, never from the worker count),
    each ending at a document boundary, in corpus order."""
    if unit_bytes is None:
        total = sum(os.path.getsize(path) for kind, path in sources if kind != "pydoc")
        unit_bytes = min(UNIT_BYTES, max(MIN_UNIT_BYTES, total // 64))
    units: list[Unit] = []
    for kind, path in sources:
        size = os.path.getsize(path)
        if kind == "pydoc":
            units.append((kind, path, 0, size))
            continue
        start = 0
        with open(path, "rb") as handle:
            while start < size:
                handle.seek(start + unit_bytes)
                end = _document_boundary(handle, kind) if start + unit_bytes < size else size
                units.append((kind, path, start, min(end, size)))
                start = end
    return units


def _document_boundary(handle, kind: str) -> int:
    """The position after the first document end at or after the handle's position (text: a blank line)."""
    handle.readline()  # the rest of the line we landed in
    if kind == "jsonl":
        return handle.tell()
    while line := handle.readline():
        if not line.strip():
            return handle.tell()
    return handle.tell()


def _documents(unit: Unit) -> Iterator[list[str]]:
    """The documents of a unit as lists of sentences, read as data.read_documents reads them."""
    kind, path, start, end = unit
    if kind == "pydoc":
        for doc in module_docstrings(path):
            sentences = [" ".join(p.split()) for p in doc.split("\n\n")]
            if sentences := [s for s in sentences if s]:
                yield sentences
        return
    with open(path, "rb") as handle:
        handle.seek(start)
        text = handle.read(end - start).decode("utf-8", errors="replace")
    if kind == "jsonl":
        offset = start
        for line in text.split("\n"):
            where, offset = offset, offset + len(line.encode("utf-8", errors="replace")) + 1
            if not line.strip():
                continue
            if sentences := jsonl_sentences(line, path, f"the line at byte {where}"):
                yield sentences
        return
    sentences: list[str] = []
    for line in text.splitlines():
        if line := line.strip():
            sentences.append(line)
        elif sentences:
            yield sentences
            sentences = []
    if sentences:
        yield sentences


_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    # One process per core is the parallelism; the tokenizer's own threads would only compete with the others.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # The fast tokenizer's own file (save_pretrained wrote it): loads in milliseconds, as each worker starts.
    _worker_tokenizer = Tokenizer.from_file(str(pathlib.Path(tokenizer_dir) / "tokenizer.json"))


def tokenize_unit(unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(token ids uint32, sentence lengths, sentences per document, bytes read) of one unit; empty sentences and
    documents are dropped."""
    sentence_counts: list[int] = []
    sentences: list[str] = []
    for document in _documents(unit):
        sentences += document
        sentence_counts.append(len(document))
    encodings = _worker_tokenizer.encode_batch_fast(sentences, add_special_tokens=False) if sentences else []
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    tokens = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.uint32,
                         count=int(lengths.sum()))
    # Drop sentences that tokenize to nothing, then documents left without a sentence.
    document_of = np.repeat(np.arange(len(sentence_counts)), sentence_counts)
    kept = lengths > 0
    documents = np.bincount(document_of[kept], minlength=len(sentence_counts))
    return tokens, lengths[kept], documents[documents > 0], unit[3] - unit[2]


class _ShardWriter:
    """Appends units' arrays to shard files in a folder, closing a shard past `shard_tokens`; records the manifest
    entries (counts, sizes, checksums)."""

    def __init__(self, folder: pathlib.Path, dtype: np.dtype, shard_tokens: int):
        self.folder = folder
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.entries: list[dict[str, Any]] = []
        self.files: dict[str, Any] = {}
        self.counts = {"tokens": 0, "sentences": 0, "documents": 0}

    def add(self, tokens: np.ndarray, lengths: np.ndarray, documents: np.ndarray) -> None:
        if not len(documents):
            return
        if not self.files:  # open across units until the shard closes
            self.files = {kind: open(self.folder / shard_file(len(self.entries), kind), "wb")  # noqa: SIM115
                          for kind in FILE_KINDS}
        self.files["tokens"].write(tokens.astype(self.dtype).tobytes())
        self.files["sentences"].write((self.counts["tokens"] + np.cumsum(lengths)).astype(np.int64).tobytes())
        self.files["documents"].write((self.counts["sentences"] + np.cumsum(documents)).astype(np.int64).tobytes())
        self.counts["tokens"] += len(tokens)
        self.counts["sentences"] += len(lengths)
        self.counts["documents"] += len(documents)
        if self.counts["tokens"] >= self.shard_tokens:
            self.close_shard()

    def close_shard(self) -> None:
        if not self.files:
            return
        entry: dict[str, Any] = {}
        for kind, handle in self.files.items():
            handle.close()
            path = pathlib.Path(handle.name)
            entry[kind] = {"file": path.name, "count": self.counts[kind], "bytes": path.stat().st_size,
                           "sha256": file_sha256(path)}
        self.entries.append(entry)
        self.files = {}
        self.counts = {"tokens": 0, "sentences": 0, "documents": 0}


def prepare(corpus: list[str], output_dir: str, tokenizer: str | None = None, vocab_size: int | None = None,
            max_seq_len: int = 512, workers: int | None = None, overwrite: bool = False,
            tokenizer_train_docs: int = 200_000, shard_tokens: int = SHARD_TOKENS, progress: bool = True,
            unit_bytes: int | None = None) -> dict[str, Any]:
    """Tokenize `corpus` into a prepared folder at `output_dir`; returns the manifest. See `electra-triton prepare`."""
    out = pathlib.Path(output_dir)
    workers = workers or len(os.sched_getaffinity(0))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if max_seq_len < 8:
        raise ValueError(f"--max-seq-len must be >= 8, got {max_seq_len}")
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise ValueError(f"--output-dir {out} is a file: choose a folder")
        what = "a prepared dataset" if (out / MANIFEST).exists() else "files"
        if what != "files" or any(out.iterdir()):
            raise ValueError(f"--output-dir {out} already holds {what}: pass --overwrite to replace it, or choose "
                             "another --output-dir; nothing was written")
    sources = resolve_corpus(corpus)
    tokenizer_object = load_tokenizer(tokenizer) if tokenizer else None
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if progress else (lambda text: None)

    new_parents = [folder for folder in reversed(out.parents) if not folder.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    finished = False
    try:
        if tokenizer_object is None:
            vocab_size = vocab_size or PRESETS["base"]["discriminator"]["vocab_size"]
            say(f"tokenizer: training a {vocab_size}-token WordPiece vocab on the corpus (--tokenizer DIR to use "
                "your own)")
            tokenizer_object = train_tokenizer(sources, vocab_size, tokenizer_train_docs, max_seq_len)
        tokenizer_object.save_pretrained(staging / TOKENIZER_DIR)
        if not (staging / TOKENIZER_DIR / "tokenizer.json").is_file():
            raise ValueError(f"--tokenizer {tokenizer}: not a fast (Rust `tokenizers`) tokenizer, which prepare's "
                             "workers need: convert it (AutoTokenizer.from_pretrained(..., use_fast=True)) and save it")
        manifest = _tokenize(work_units(sources, unit_bytes), staging, tokenizer_object, workers, shard_tokens,
                             progress)
        manifest.update({"corpus": list(corpus), "max_seq_len": max_seq_len})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if out.exists():
            retired = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, retired)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
        finished = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not finished:  # leave nothing behind, not even the folders made for the output
            for folder in reversed(new_parents):
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return manifest


def _tokenize(units: list[Unit], staging: pathlib.Path, tokenizer, workers: int, shard_tokens: int, progress: bool
              ) -> dict[str, Any]:
    dtype = token_dtype(len(tokenizer))
    writer = _ShardWriter(staging, dtype, shard_tokens)
    total_bytes = sum(end - start for _, _, start, end in units)
    tokenizer_dir = str(staging / TOKENIZER_DIR)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    if workers == 1:
        _init_worker(tokenizer_dir)
        results = map(tokenize_unit, units)
        pool = None
    else:
        # fork (before the progress bar's thread exists): workers start in milliseconds, not by importing torch
        # again. The parent's tokenizer threads (vocab training) must not be inherited: declared off before forking.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer_dir,))
        results = pool.imap(tokenize_unit, units)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress, dynamic_ncols=True)
    started, tokens = time.perf_counter(), 0
    try:
        for unit_tokens, lengths, documents, read in results:
            writer.add(unit_tokens, lengths, documents)
            tokens += len(unit_tokens)
            bar.update(read)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tokens/s", refresh=False)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
        if parallelism is None:  # what _init_worker or the fork above changed in this process
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    writer.close_shard()
    counts = {kind: sum(entry[kind]["count"] for entry in writer.entries) for kind in FILE_KINDS}
    if counts["tokens"] == 0:
        names = _describe(list(dict.fromkeys((kind, path) for kind, path, _, _ in units)))
        raise CorpusError(f"the corpus ({names}) contains no text: pass non-empty files to --corpus")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "token_dtype": dtype.name, **counts,
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                          **{name: getattr(tokenizer, name + "_id") for name in ("cls_token", "sep_token",
                                                                                  "mask_token", "pad_token")}},
            "shards": writer.entries}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="electra-triton prepare",
        description="Tokenize a corpus once into memory-mapped token shards for `electra-triton pretrain --data`.",
    )
    parser.add_argument("--corpus", nargs="+", required=True,
                        help=f"text files (blank line between documents), folders of them, .jsonl files with a 'text' "
                        f"field, or '{BUILTIN_CORPUS}' (docstrings of the Python standard library)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="a local Hugging Face tokenizer folder (default: train a WordPiece vocab)")
    group.add_argument("--vocab-size", type=int, help="size of the trained WordPiece vocab (default 30522)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="the tokenizer's model_max_length (default 512)")
    parser.add_argument("--output-dir", required=True, help="the prepared folder to write")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: every core)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--tokenizer-train-docs", type=int, default=200_000,
                        help="documents read to train the WordPiece vocab")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = prepare(args.corpus, args.output_dir, args.tokenizer, args.vocab_size, args.max_seq_len,
                           args.workers, args.overwrite, args.tokenizer_train_docs)
    except (CorpusError, ValueError) as error:
        print(f"electra-triton prepare: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("electra-triton prepare: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"prepared {args.output_dir}: {manifest['documents']:,} documents, {manifest['sentences']:,} sentences, "
          f"{manifest['tokens']:,} tokens in {len(manifest['shards'])} shard(s) ({manifest['token_dtype']}); train "
          f"with: electra-triton pretrain --data {args.output_dir}")
    return 0
