"""Prepared data (`electra-triton prepare`): the folder format, its validation, and the example stream over it.

A prepared folder holds

    manifest.json                 written last: its presence marks a finished dataset
    tokenizer/                    the Hugging Face tokenizer the ids come from
    shard-NNNNN.tokens.bin        token ids of the shard's sentences, end to end (uint16, or uint32 for vocabularies
                                  over 65536 tokens)
    shard-NNNNN.sentences.bin     int64: the end offset (in tokens) of each sentence of the shard
    shard-NNNNN.documents.bin     int64: the end offset (in sentences) of each document of the shard

Documents keep corpus order (sources in `resolve_corpus` order, documents in file order), across shards, so that
document ids are corpus positions (the held-out split is the first K documents). The manifest records the format
version, the tokenizer (fingerprint, vocab size, special ids), counts, and each file's size and SHA-256; `open_dataset`
checks all of them and names the file and the fix when one does not match.

`ShardExampleStream` is `ExampleStream` over memory-mapped shards: the same ExampleBuilder (over sentence spans of
the shards, no per-token Python), the same shuffle buffer; documents in an order shuffled per epoch, dealt to ranks
round-robin; `state_dict()` is a small dict that pins the exact position.
"""

import dataclasses
import hashlib
import json
import pathlib
import random
from typing import Any

import numpy as np

from .data import (
    ExampleBuilder,
    Span,
    _rng_state,
    _set_rng_state,
    check_tokenizer,
    load_tokenizer,
)

FORMAT = "electra-triton-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FILE_KINDS = ("tokens", "sentences", "documents")


class DataError(ValueError):
    """A prepared data folder cannot be used as it is; the message names the file and the fix."""


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the vocabulary and special tokens: equal iff two tokenizers map text to the same ids (for the
    WordPiece/BPE vocabularies used here), and stable across transformers versions (unlike the serialized file)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    specials = {name: getattr(tokenizer, name + "_id", None) for name in ("cls_token", "sep_token", "mask_token",
                                                                          "pad_token", "unk_token")}
    return hashlib.sha256(json.dumps([vocab, specials]).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_file(index: int, kind: str) -> str:
    return f"shard-{index:05d}.{kind}.bin"


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Shard:
    tokens: np.ndarray  # (tokens,) uint16/uint32, memory-mapped
    sentence_ends: np.ndarray  # (sentences,) int64
    document_ends: np.ndarray  # (documents,) int64


class PreparedData:
    """An opened, validated prepared folder: its manifest, tokenizer and memory-mapped shards."""

    def __init__(self, path: pathlib.Path, manifest: dict[str, Any], shards: list[Shard]):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        counts = np.array([len(shard.document_ends) for shard in shards], dtype=np.int64)
        self.num_documents = int(counts.sum())
        # Global document id -> (shard, document within the shard)
        self.document_shard = np.repeat(np.arange(len(shards)), counts)
        self.document_base = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._tokenizer = None

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(self.path / TOKENIZER_DIR))
        return self._tokenizer

    def document_sentences(self, document: int) -> tuple[int, list[Span]]:
        """(shard, sentence spans in the shard's token array) of a global document id."""
        shard_index = int(self.document_shard[document])
        shard = self.shards[shard_index]
        local = document - int(self.document_base[shard_index])
        first = int(shard.document_ends[local - 1]) if local else 0  # sentences [first, last)
        last = int(shard.document_ends[local])
        ends = shard.sentence_ends[first:last].tolist()
        starts = [int(shard.sentence_ends[first - 1]) if first else 0, *ends[:-1]]
        return shard_index, list(zip(starts, ends, strict=True))


def open_dataset(path: str | pathlib.Path, tokenizer=None, verify: bool = True) -> PreparedData:
    """Open a prepared folder; raises DataError naming the file and the fix when anything does not match.

    tokenizer: the tokenizer the caller will use (a --tokenizer, or a resumed run's): it must be the one the data was
    tokenized with. verify: compare every file's SHA-256 with the manifest (reads the files once).
    """
    folder = pathlib.Path(path)
    redo = f"run `electra-triton prepare --corpus ... --output-dir {folder}` (with --overwrite to replace it)"
    if not folder.is_dir():
        raise DataError(f"--data {folder}: no such folder; {redo} first")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"--data {folder} is not a finished prepared dataset (no {MANIFEST}: prepare was interrupted, "
                        f"or this is another folder); {redo}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{manifest_path} is unreadable ({error}); {redo}") from error
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('format_version')} "
                        f"is not {FORMAT!r} version {FORMAT_VERSION} (made by another electra-triton); {redo}")
    if tokenizer is not None:
        check_tokenizer(tokenizer, "the run's tokenizer")
        if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
            raise DataError(
                f"--data {folder} was tokenized with another tokenizer than this run's (vocab fingerprints differ): "
                f"leave --tokenizer out to use the data's own ({folder / TOKENIZER_DIR}), or prepare the corpus again "
                "with this tokenizer (`electra-triton prepare --tokenizer DIR ...`)"
            )
    dtype = np.dtype(manifest["token_dtype"])
    shards = []
    for entry in manifest["shards"]:
        arrays = {}
        for kind, kind_dtype in zip(FILE_KINDS, (dtype, np.dtype(np.int64), np.dtype(np.int64)), strict=True):
            file = folder / entry[kind]["file"]
            expected = entry[kind]["bytes"]
            if not file.is_file():
                raise DataError(f"{file} is missing; {redo}")
            size = file.stat().st_size
            if size != expected:
                raise DataError(f"{file} is truncated or damaged: {size} bytes, the manifest says {expected}; {redo}")
            if verify and file_sha256(file) != entry[kind]["sha256"]:
                raise DataError(f"{file} is corrupt: its SHA-256 does not match the manifest; {redo}")
            count = size // kind_dtype.itemsize
            # A plain ndarray view of the map: np.memmap's own indexing costs microseconds per slice.
            arrays[kind] = np.memmap(file, dtype=kind_dtype, mode="r", shape=(count,)).view(np.ndarray) if count \
                else np.zeros(0, kind_dtype)
        shard = Shard(arrays["tokens"], arrays["sentences"], arrays["documents"])
        if (len(shard.sentence_ends) and shard.sentence_ends[-1] != len(shard.tokens)) or \
                (len(shard.document_ends) and shard.document_ends[-1] != len(shard.sentence_ends)):
            raise DataError(f"{folder / entry['tokens']['file']}: offsets do not match the token count; {redo}")
        shards.append(shard)
    data = PreparedData(folder, manifest, shards)
    if data.num_documents != manifest["documents"]:
        raise DataError(f"{manifest_path}: {manifest['documents']} documents listed, the shards hold "
                        f"{data.num_documents}; {redo}")
    return data


class ShardExampleStream:
    """An endless, deterministic stream of ELECTRA examples from prepared shards, for one rank.

    Examples are (shard, A spans, B spans): `materialize` turns one into its ids. Epoch e visits this split's
    documents in an order shuffled with (seed, e), document i of that order going to rank i % world_size; examples
    pass through a shuffle buffer. held_out_docs / split: the first `held_out_docs` documents are the held-out set;
    "train" skips them, "eval" reads only them.
    """

    def __init__(self, data: PreparedData, max_seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256, held_out_docs: int = 0, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= held_out_docs <= data.num_documents:
            raise ValueError(f"held_out_docs must be in [0, {data.num_documents}] (the documents of {data.path}), "
                             f"got {held_out_docs}")
        self.data = data
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.held_out_docs = held_out_docs
        self.split = split
        first, last = (held_out_docs, data.num_documents) if split == "train" else (0, held_out_docs)
        self.documents = np.arange(first, last, dtype=np.int64)
        if len(self.documents) < world_size:
            raise DataError(
                f"--data {data.path}: the {split} split has {len(self.documents)} documents, fewer than the "
                f"{world_size} processes: prepare a larger corpus" + (" or hold out fewer documents" if held_out_docs
                                                                      else ""))
        self.rng = random.Random(f"electra-pack-{seed}-{rank}")
        self.builder = ExampleBuilder(max_seq_len, self.rng)
        self.epoch = 0
        self.cursor = 0  # index into this rank's documents of the epoch
        self.pending: list[tuple[int, list[Span], list[Span], int, int]] = []
        self.buffer: list[tuple[int, list[Span], list[Span], int, int]] = []
        self._epoch_documents = self._rank_documents()

    def _rank_documents(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.documents)
        return order[self.rank:: self.world_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "pending": list(self.pending), "buffer": list(self.buffer),
                "rng": _rng_state(self.rng), "builder": self.builder.state_dict(), "rank": self.rank,
                "world_size": self.world_size, "documents": len(self.documents), "split": self.split,
                "fingerprint": self.data.manifest["tokenizer"]["fingerprint"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"the checkpoint's data position is for rank {state['rank']} of {state['world_size']}, this process "
                f"is rank {self.rank} of {self.world_size}: resume with the same number of processes"
            )
        if state["documents"] != len(self.documents) or state["split"] != self.split or \
                state["fingerprint"] != self.data.manifest["tokenizer"]["fingerprint"]:
            raise ValueError(f"the checkpoint was taken on other prepared data than {self.data.path} "
                             f"({state['documents']} {state['split']} documents): resume with the same --data")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._epoch_documents = self._rank_documents()
        self.pending = [self.restore_example(item) for item in state["pending"]]
        self.buffer = [self.restore_example(item) for item in state["buffer"]]
        _set_rng_state(self.rng, state["rng"])
        self.builder.load_state_dict(state["builder"])

    def _next_document_examples(self) -> None:
        while not self.pending:
            if self.cursor == len(self._epoch_documents):
                self.epoch += 1
                self.cursor = 0
                self._epoch_documents = self._rank_documents()
            shard, sentences = self.data.document_sentences(int(self._epoch_documents[self.cursor]))
            self.cursor += 1
            self.pending += [(shard, *example) for example in self.builder.add_document(sentences)]
        self.pending.reverse()  # popped from the end, in build order

    def next_example(self) -> tuple[int, list[Span], list[Span], int, int]:
        while len(self.buffer) < self.shuffle_buffer:
            if not self.pending:
                self._next_document_examples()
            self.buffer.append(self.pending.pop())
        index = self.rng.randrange(len(self.buffer))
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        return self.buffer.pop()

    @staticmethod
    def example_length(example: tuple[int, list[Span], list[Span], int, int]) -> int:
        """Slots the example takes in a row: [CLS] A [SEP] (B [SEP])."""
        _, _, _, length_a, length_b = example
        return length_a + length_b + (3 if length_b else 2)

    def materialize(self, example: tuple) -> tuple[list[np.ndarray], list[np.ndarray], int, int]:
        """The ids of segments A and B as lists of views of the shard, and their lengths."""
        shard, first, second, length_a, length_b = example
        tokens = self.data.shards[shard].tokens
        return [tokens[s:e] for s, e in first], [tokens[s:e] for s, e in second], length_a, length_b

    @staticmethod
    def restore_example(item) -> tuple:
        """An example as state_dict() holds it, after a round trip through a checkpoint (lists for tuples)."""
        shard, first, second, length_a, length_b = item
        return shard, [tuple(span) for span in first], [tuple(span) for span in second], length_a, length_b
