"""Corpus reading, tokenizer, and ELECTRA example building: streaming, deterministic, rank-sharded, resumable.

Input formats (a corpus is a list of paths; folders are searched recursively, files sorted by name):
- text (.txt, .text, .md, .rst or any other non-jsonl file): one sentence or paragraph per line, a blank line between
  documents (the format of BERT's and ELECTRA's pre-training text);
- jsonl (.jsonl, .json lines): one document per line, an object with a "text" field (lines of it are sentences);
- `stdlib`: the built-in corpus, docstrings of the Python standard library's .py files (read with `ast`, nothing
  imported, nothing downloaded).

Examples follow google-research/electra build_pretraining_dataset.py (ExampleBuilder): sentences are accumulated until
they reach the target length, then split into segment A and segment B ("[CLS] A [SEP] B [SEP]"), with 10% single-
segment examples and 5% random-length targets. Unlike the original, a sentence longer than one example is cut into
example-sized pieces instead of being truncated, so no text is dropped.

Streaming: documents are read one at a time from disk and tokenized per document. Each rank tokenizes only the
documents whose running index is its own (index % world_size == rank), so ranks see disjoint data. The stream's
state (file, byte offset, document index, example builder, RNG state, shuffle buffer) is a small JSON-able dict
saved in every checkpoint: a resumed stream continues at the exact example. Rows (one example each, or several packed
together) are made from a stream's examples by `packing.Batcher`; `shards.ShardExampleStream` is this stream over
data tokenized once by `electra-triton prepare`.

Held-out split: the first `held_out_docs` documents in corpus order (sources in `resolve_corpus` order, documents in
file order) are never trained on, whatever the epoch's file order. `split="train"` skips them; `split="eval"` reads
only them, once, in corpus order without shuffling (the same examples every time), and then `next_example` raises
`EndOfSplit`.
"""

import ast
import json
import pathlib
import queue
import random
import sysconfig
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .packing import Batcher

BUILTIN_CORPUS = "stdlib"
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


class CorpusError(ValueError):
    """The corpus cannot be used (missing, unreadable, empty, malformed); the message names the fix."""


class EndOfSplit(Exception):  # noqa: N818 (an end marker, as StopIteration, not an error)
    """An eval split has been read to its end."""


# ----------------------------------------------------------------------------------------------------------------
# Sources: a file and how to read documents from it, starting at a position (byte offset, or docstring index)


def resolve_corpus(paths: list[str]) -> list[tuple[str, str]]:
    """(kind, path) for every file of the corpus, kind in {"text", "jsonl", "pydoc"}; checks each is readable."""
    sources: list[tuple[str, str]] = []
    for spec in paths:
        if spec == BUILTIN_CORPUS:
            root = pathlib.Path(sysconfig.get_paths()["stdlib"])
            files = sorted(
                p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])
            )
            sources += [("pydoc", str(p)) for p in files]
            continue
        path = pathlib.Path(spec)
        if not path.exists():
            raise CorpusError(f"corpus path {spec!r} does not exist: pass existing files or folders to --corpus")
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
            else [path]
        if not files:
            raise CorpusError(f"corpus folder {spec!r} holds no files: add text or .jsonl files, or fix --corpus")
        for file in files:
            try:
                with open(file, "rb") as handle:
                    handle.read(1)
            except OSError as error:
                raise CorpusError(
                    f"cannot read corpus file {str(file)!r} ({error.strerror}): fix its permissions or leave it out "
                    "of --corpus"
                ) from error
            sources.append(("jsonl" if file.suffix in (".jsonl", ".json") else "text", str(file)))
    if not sources:
        raise CorpusError(f"corpus {paths} holds no files: pass text files, folders or .jsonl files to --corpus")
    return sources


def module_docstrings(path: str) -> list[str]:
    try:
        tree = ast.parse(pathlib.Path(path).read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef |
                                                     ast.AsyncFunctionDef))
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc and doc.strip()]


def jsonl_sentences(line: str, path: str, where: str) -> list[str]:
    """The non-empty lines of one jsonl record's "text" field (or of a bare JSON string); CorpusError naming the
    file and `where` in it otherwise."""
    try:
        record = json.loads(line)
        text = record["text"] if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise TypeError
    except (ValueError, KeyError, TypeError) as error:
        raise CorpusError(f"{path}: {where} is not a JSON object with a string 'text' field: fix the line, or "
                          "rename the file to .txt to read it as plain text") from error
    return [s.strip() for s in text.splitlines() if s.strip()]


def read_documents(kind: str, path: str, position: int = 0) -> Iterator[tuple[list[str], int]]:
    """Yield (sentences, position after the document) from `position` on."""
    if kind == "pydoc":
        for index, doc in enumerate(module_docstrings(path)[position:], start=position + 1):
            # Paragraphs are the sentences: docstring lines are wrapped at ~80 columns mid-sentence.
            paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
            yield [p for p in paragraphs if p], index
        return
    with open(path, "rb") as handle:
        handle.seek(position)
        sentences: list[str] = []
        line_number = 0
        while True:
            raw = handle.readline()
            line_number += 1
            if not raw:
                if sentences:
                    yield sentences, handle.tell()
                return
            line = raw.decode("utf-8", errors="replace").strip()
            if kind == "jsonl":
                if not line:
                    continue
                lines = jsonl_sentences(line, path, f"line {line_number} after byte {position}")
                if lines:
                    yield lines, handle.tell()
            elif line:
                sentences.append(line)
            elif sentences:
                yield sentences, handle.tell()
                sentences = []


def held_out_boundary(sources: list[tuple[str, str]], held_out_docs: int) -> tuple[int, int]:
    """(source index, position in it) right after the first `held_out_docs` documents in corpus order.

    Raises CorpusError when no document is left after them (nothing to train on).
    """
    count = 0
    boundary = (0, 0)
    for index, (kind, path) in enumerate(sources):
        for _, end in read_documents(kind, path):
            if count == held_out_docs:
                return boundary
            count += 1
            boundary = (index, end)
    raise CorpusError(
        f"holding out {held_out_docs} documents for evaluation leaves none to train on: the corpus "
        f"({_describe(sources)}) has {count}. Hold out fewer (--eval-docs), or evaluate on another corpus "
        "(--eval-corpus)"
    )


def count_documents(sources: list[tuple[str, str]], limit: int) -> int:
    """Documents in the corpus, counted up to `limit` (reading stops there)."""
    count = 0
    for kind, path in sources:
        for _ in read_documents(kind, path):
            count += 1
            if count >= limit:
                return count
    return count


def iter_sentences(sources: list[tuple[str, str]], max_documents: int) -> Iterator[str]:
    count = 0
    for kind, path in sources:
        for sentences, _ in read_documents(kind, path):
            yield from sentences
            count += 1
            if count >= max_documents:
                return


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(sources: list[tuple[str, str]], vocab_size: int, max_documents: int, model_max_length: int):
    """A lower-cased BERT-style WordPiece tokenizer (as ELECTRA's) trained on the corpus, as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2)
    counted = [0]

    def counting() -> Iterator[str]:
        for sentence in iter_sentences(sources, max_documents):
            counted[0] += 1
            yield sentence

    tokenizer.train_from_iterator(counting(), trainer=trainer)
    if counted[0] == 0:
        raise CorpusError(
            f"the corpus ({_describe(sources)}) contains no text: pass non-empty files to --corpus"
        )
    # The trainer numbers tokens in hash-map order, which changes from process to process: renumber them (specials
    # first, then sorted) so that the same corpus gives the same ids, and a run is reproducible from its seed.
    learned = sorted(set(tokenizer.get_vocab()) - set(specials), key=lambda t: (t.startswith("##"), t))
    tokenizer.model = models.WordPiece({t: i for i, t in enumerate(specials + learned)}, unk_token="[UNK]")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not pathlib.Path(path).is_dir():
        raise ValueError(f"--tokenizer {path!r} is not a folder: pass a local Hugging Face tokenizer folder "
                         "(with tokenizer.json or vocab.txt), or leave --tokenizer out to train one on the corpus")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--tokenizer {path!r}: cannot load a tokenizer from it ({error})") from error
    check_tokenizer(tokenizer, path)
    return tokenizer


def check_tokenizer(tokenizer, name: str) -> None:
    missing = [f"{SPECIAL_TOKENS[attr]} ({attr})" for attr in ("cls_token", "sep_token", "mask_token", "pad_token")
               if getattr(tokenizer, attr + "_id", None) is None]
    if missing:
        raise ValueError(
            f"tokenizer {name!r} has no {', '.join(missing)}: ELECTRA needs [CLS], [SEP], [MASK] and [PAD] tokens. "
            "Use a BERT/ELECTRA-style tokenizer, add them (tokenizer.add_special_tokens) and save it, or leave "
            "--tokenizer out to train a WordPiece vocab on the corpus"
        )


def _describe(sources: list[tuple[str, str]]) -> str:
    names = [path for _, path in sources[:3]]
    return ", ".join(names) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")


# ----------------------------------------------------------------------------------------------------------------
# Examples


Span = tuple[int, int]  # [start, end) of a sentence's ids in a token array (a document's, or a shard's)
Example = tuple[list[Span], list[Span], int, int]  # segment A spans, segment B spans, their token counts


def _truncate(spans: list[Span], limit: int) -> tuple[list[Span], int]:
    kept: list[Span] = []
    length = 0
    for start, end in spans:
        if length >= limit:
            break
        end = min(end, start + limit - length)
        kept.append((start, end))
        length += end - start
    return kept, length


class ExampleBuilder:
    """google-research/electra's ExampleBuilder: sentences in, [CLS] A [SEP] B [SEP] examples out.

    It sees sentences as spans of a token array, never the ids themselves, so that the raw-text stream (spans of a
    tokenized document) and the prepared-shard stream (spans of a memory-mapped shard) build the same examples with
    no per-token Python. Unlike the original, a sentence longer than one example is cut into example-sized pieces
    instead of being truncated, so that no text is dropped.
    """

    def __init__(self, max_length: int, rng: random.Random):
        self.max_length = max_length
        self.target_length = max_length
        self.sentences: list[Span] = []
        self.length = 0
        self.rng = rng

    def add_document(self, sentences: list[Span]) -> list[Example]:
        """The examples of one document's sentences (the last one ends with the document)."""
        examples = []
        piece = self.max_length - 3
        for start, end in sentences:
            for at in range(start, end, piece):
                stop = min(at + piece, end)
                self.sentences.append((at, stop))
                self.length += stop - at
                if self.length >= self.target_length:
                    examples.append(self.create())
        if self.length:
            examples.append(self.create())
        return examples

    def create(self) -> Example:
        # A small chance of one segment only, as in classification tasks; -3 for [CLS] and the two [SEP].
        first_target = 100_000 if self.rng.random() < 0.1 else (self.target_length - 3) // 2
        first: list[Span] = []
        second: list[Span] = []
        first_length = 0
        for start, end in self.sentences:
            if (not first or first_length + end - start < first_target
                    or (not second and first_length < first_target and self.rng.random() < 0.5)):
                first.append((start, end))
                first_length += end - start
            else:
                second.append((start, end))
        first, first_length = _truncate(first, self.max_length - 2)
        second, second_length = _truncate(second, self.max_length - first_length - 3)
        self.sentences, self.length = [], 0
        # A small chance of a random-length example, so that the model also sees short inputs.
        self.target_length = self.rng.randint(5, self.max_length) if self.rng.random() < 0.05 else self.max_length
        return first, second, first_length, second_length

    def state_dict(self) -> dict[str, Any]:
        return {"sentences": list(self.sentences), "length": self.length, "target_length": self.target_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sentences = [tuple(span) for span in state["sentences"]]
        self.length, self.target_length = state["length"], state["target_length"]


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class ExampleStream:
    """An endless, deterministic stream of packed examples for one rank; `state_dict()` pins its exact position.

    Epoch e reads the sources in an order shuffled with (seed, e); examples pass through a shuffle buffer. With
    `held_out_docs` > 0 the first that many documents of the corpus are held out: `split="train"` never reads them,
    `split="eval"` reads only them (once, in order, unshuffled; see the module docstring).
    """

    def __init__(self, sources: list[tuple[str, str]], tokenizer, max_seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 256, held_out_docs: int = 0, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if held_out_docs < 0:
            raise ValueError(f"held_out_docs must be >= 0, got {held_out_docs}")
        self.split = split
        self.held_out_docs = held_out_docs
        # Training starts each source at this (index, position) boundary's right: sources before it are held out.
        self.train_start = held_out_boundary(sources, held_out_docs) if split == "train" and held_out_docs else (0, 0)
        self.sources = sources
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        self.rng = random.Random(f"electra-pack-{seed}-{rank}")
        self.builder = ExampleBuilder(max_seq_len, self.rng)
        self.epoch = 0
        self.source_index = 0  # into this epoch's order
        self.position = 0  # within the current source
        self.document = 0  # documents seen by all ranks, so that they agree on which rank owns a document
        self.epoch_examples = 0  # examples this rank built in this epoch; 0 at the end of an epoch means no data
        self.pending: list[tuple[list[int], list[int]]] = []  # built from the current document, not yet buffered
        self.buffer: list[tuple[list[int], list[int]]] = []
        self._open: list | None = None  # [(epoch, source_index, position), documents iterator]

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "source_index": self.source_index, "position": self.position,
            # Shallow copies suffice (and keep this cheap enough to call per batch): examples and sentences are
            # never mutated once built.
            "document": self.document, "epoch_examples": self.epoch_examples, "pending": list(self.pending),
            "buffer": list(self.buffer), "rng": _rng_state(self.rng), "builder": self.builder.state_dict(),
            "rank": self.rank, "world_size": self.world_size, "num_sources": len(self.sources),
            "held_out_docs": self.held_out_docs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"the checkpoint's data position is for rank {state['rank']} of {state['world_size']}, this process "
                f"is rank {self.rank} of {self.world_size}: resume with the same number of processes"
            )
        if state["num_sources"] != len(self.sources):
            raise ValueError(
                f"the checkpoint was taken on a corpus of {state['num_sources']} files, --corpus now has "
                f"{len(self.sources)}: resume with the same --corpus"
            )
        if state.get("held_out_docs", 0) != self.held_out_docs:
            raise ValueError(
                f"the checkpoint was taken with {state.get('held_out_docs', 0)} held-out documents, this run holds "
                f"out {self.held_out_docs}: resume with the same --eval-docs"
            )
        for key in ("epoch", "source_index", "position", "document", "epoch_examples"):
            setattr(self, key, state[key])
        self.pending = [self.restore_example(item) for item in state["pending"]]
        self.buffer = [self.restore_example(item) for item in state["buffer"]]
        _set_rng_state(self.rng, state["rng"])
        self.builder.load_state_dict(state["builder"])

    # -- reading
    def _order(self) -> list[int]:
        order = list(range(len(self.sources)))
        if self.split == "train":
            random.Random(f"electra-files-{self.seed}-{self.epoch}").shuffle(order)
        return order

    def _start_position(self, source: int) -> int | None:
        """Where training reads `source` from; None when the whole source is held out."""
        held_source, held_position = self.train_start
        if source < held_source:
            return None
        return held_position if source == held_source else 0

    def _reader(self) -> Iterator[tuple[list[str], int]]:
        # Keep the current file's reader open between calls: reopening (or re-parsing a .py file) per document
        # would be quadratic in the file's size. A restored state or a new epoch opens a fresh reader.
        key = (self.epoch, self.source_index, self.position)
        if self._open is None or self._open[0] != key:
            kind, path = self.sources[self._order()[self.source_index]]
            self._open = [key, read_documents(kind, path, self.position)]
        for item in self._open[1]:
            self._open[0] = (self.epoch, self.source_index, item[1])
            yield item

    def _next_document_examples(self) -> None:
        """Read forward to this rank's next document and pack it into self.pending."""
        while True:
            if self.split == "eval" and (self.document >= self.held_out_docs or self.source_index >= len(self.sources)):
                raise EndOfSplit
            if self.source_index >= len(self.sources):
                if self.epoch_examples == 0:
                    raise CorpusError(
                        f"the corpus ({_describe(self.sources)}) yielded no text"
                        + (f" for rank {self.rank} of {self.world_size} (fewer documents than processes?)"
                           if self.world_size > 1 else "")
                        + ": pass non-empty files to --corpus"
                    )
                self.epoch += 1
                self.source_index, self.position, self.epoch_examples = 0, 0, 0
            if self.split == "train":
                start = self._start_position(self._order()[self.source_index])
                if start is None:
                    self.source_index += 1
                    continue
                self.position = max(self.position, start)
            for sentences, end in self._reader():
                self.position = end
                if self.split == "eval" and self.document >= self.held_out_docs:
                    raise EndOfSplit
                mine = self.document % self.world_size == self.rank
                self.document += 1
                if not mine:
                    continue
                encoded = self.tokenizer(sentences, add_special_tokens=False, verbose=False)["input_ids"]
                document: list[int] = []
                spans = []
                for ids in encoded:
                    spans.append((len(document), len(document) + len(ids)))
                    document += ids
                self.pending += [([i for s, e in first for i in document[s:e]],
                                  [i for s, e in second for i in document[s:e]])
                                 for first, second, _, _ in self.builder.add_document(spans)]
                if self.pending:
                    self.epoch_examples += len(self.pending)
                    return
            self.source_index += 1
            self.position = 0
            self._open = None

    def next_example(self) -> tuple[list[int], list[int]]:
        if self.split == "eval":
            if not self.pending:
                self._next_document_examples()
            return self.pending.pop(0)
        while len(self.buffer) < self.shuffle_buffer:
            if not self.pending:
                self._next_document_examples()
            self.buffer.append(self.pending.pop(0))
        index = self.rng.randrange(len(self.buffer))
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        return self.buffer.pop()

    @staticmethod
    def example_length(example: tuple[list[int], list[int]]) -> int:
        """Slots the example takes in a row: [CLS] A [SEP] (B [SEP])."""
        first, second = example
        return len(first) + len(second) + (3 if second else 2)

    @staticmethod
    def materialize(example: tuple[list[int], list[int]]) -> tuple[list[list[int]], list[list[int]], int, int]:
        """The ids of segments A and B, each as a list of pieces (one here), and their lengths."""
        first, second = example
        return [first], [second] if second else [], len(first), len(second)

    @staticmethod
    def restore_example(item) -> tuple[list[int], list[int]]:
        return list(item[0]), list(item[1])

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """input_ids, token_type_ids, attention_mask: (batch_size, max_seq_len) int64, one example per row, padded
        with [PAD] (`packing.Batcher` packs rows and keeps a resumable pool)."""
        from .packing import Batcher

        return Batcher(self, self.max_seq_len, self.cls_id, self.sep_id, self.pad_id).next_batch(batch_size)


def special_ids(tokenizer) -> list[int]:
    return sorted(set(tokenizer.all_special_ids))


class Prefetcher:
    """Builds the next batches of `stream` (anything with next_batch(batch_size) and state_dict(): a
    `packing.Batcher`) in a background thread, so that reading, tokenizing and packing overlap the step.

    `state_dict()` is the stream's position after the last batch *taken*, not after the batches built ahead: a
    checkpoint resumes at the first batch the training loop has not seen.
    """

    def __init__(self, stream: "Batcher", batch_size: int, depth: int = 2):
        self.stream = stream
        self.batch_size = batch_size
        self.state = stream.state_dict()
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="electra-data", daemon=True)
        self.thread.start()

    def _put(self, item: tuple) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self) -> None:
        try:
            while not self.stopped.is_set():
                batch = self.stream.next_batch(self.batch_size)
                self._put((batch, self.stream.state_dict()))
        except BaseException as error:  # handed to the training loop, raised there
            self._put((error, None))

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch, state = self.queue.get()
        if isinstance(batch, BaseException):
            raise batch
        self.state = state
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
