"""`electra-triton prepare` and the prepared folder: contents, determinism whatever the workers, atomic writes, no
overwrite without --overwrite, and every bad input refused with the file and the fix named, nothing written."""

import json
import os
import pathlib

import numpy as np
import pytest
from test_pretrain_data import corpus_and_tokenizer, write_corpus  # noqa: F401 (fixture)

from electra_triton import cli
from electra_triton.pretrain import prepare as prepare_module
from electra_triton.pretrain.data import CorpusError, read_documents, resolve_corpus
from electra_triton.pretrain.prepare import prepare, work_units
from electra_triton.pretrain.shards import MANIFEST, DataError, open_dataset


@pytest.fixture(scope="module")
def tokenizer_dir(corpus_and_tokenizer, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus_and_tokenizer[1].save_pretrained(folder)
    return str(folder)


def _corpus(folder: pathlib.Path) -> list[str]:
    """Text (two files, one in a subfolder) and jsonl: every input kind prepare reads from files."""
    text = write_corpus(folder / "text", documents=80, seed=1)
    write_corpus(folder / "text" / "more", documents=30, seed=2)
    rows = [{"text": "alpha beta gamma\ndelta electra"}, {"text": "token model text"}, {"text": "  "}]
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return [str(pathlib.Path(text).parent), str(folder / "docs.jsonl")]


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_hold_the_corpus_in_order(tmp_path, tokenizer_dir, corpus_and_tokenizer):  # noqa: F811
    tokenizer = corpus_and_tokenizer[1]
    corpus = _corpus(tmp_path / "corpus")
    manifest = prepare(corpus, str(tmp_path / "data"), tokenizer=tokenizer_dir, workers=1, shard_tokens=500,
                       unit_bytes=256, progress=False)
    data = open_dataset(tmp_path / "data", tokenizer)
    assert len(manifest["shards"]) > 2 and manifest["token_dtype"] == "uint16"
    expected = []  # documents of the corpus, in order, as lists of sentence ids
    for kind, path in resolve_corpus(corpus):
        for sentences, _ in read_documents(kind, path):
            ids = [s for s in tokenizer(sentences, add_special_tokens=False)["input_ids"] if s]
            if ids:
                expected.append(ids)
    assert data.num_documents == manifest["documents"] == len(expected) == 80 + 30 + 2
    for document in range(data.num_documents):
        shard, spans = data.document_sentences(document)
        tokens = data.shards[shard].tokens
        assert [tokens[s:e].tolist() for s, e in spans] == expected[document]
    assert manifest["tokens"] == sum(len(s) for doc in expected for s in doc)
    assert (tmp_path / "data" / "tokenizer" / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_same_bytes_whatever_the_workers(tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    units = work_units(resolve_corpus(corpus), unit_bytes=300)
    assert len(units) > 8  # the workers really share the work
    for workers in (1, 2):
        prepare(corpus, str(tmp_path / f"w{workers}"), tokenizer=tokenizer_dir, workers=workers, shard_tokens=700,
                unit_bytes=300, progress=False)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")


def test_units_end_at_document_boundaries(tmp_path):
    path = write_corpus(tmp_path, documents=50)
    sources = resolve_corpus([path])
    units = work_units(sources, unit_bytes=128)
    documents = [d for unit in units for d in prepare_module._documents(unit)]
    assert documents == [sentences for sentences, _ in read_documents("text", path)]
    assert units[0][2] == 0 and units[-1][3] == os.path.getsize(path)
    assert all(a[3] == b[2] for a, b in zip(units, units[1:], strict=False))


def test_builtin_corpus_and_trained_tokenizer(tmp_path, monkeypatch):
    # The built-in corpus, a handful of its files: every .py file is one unit of docstrings.
    sources = resolve_corpus(["stdlib"])[:6]
    monkeypatch.setattr(prepare_module, "resolve_corpus", lambda corpus: sources)
    manifest = prepare(["stdlib"], str(tmp_path / "data"), vocab_size=300, workers=1, progress=False)
    assert manifest["corpus"] == ["stdlib"] and manifest["tokenizer"]["vocab_size"] <= 300
    assert open_dataset(tmp_path / "data").num_documents == manifest["documents"] > 0


def test_interrupted_prepare_leaves_nothing_that_looks_finished(tmp_path, tokenizer_dir, monkeypatch):
    corpus = _corpus(tmp_path / "corpus")
    calls = []

    def interrupted(unit):
        calls.append(unit)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return tokenize(unit)

    tokenize = prepare_module.tokenize_unit
    monkeypatch.setattr(prepare_module, "tokenize_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, str(tmp_path / "out" / "data"), tokenizer=tokenizer_dir, workers=1, unit_bytes=300,
                progress=False)
    assert not (tmp_path / "out").exists()  # neither the dataset, nor its staging folder, nor the parent made for it
    with pytest.raises(DataError, match="no such folder.*electra-triton prepare"):
        open_dataset(tmp_path / "out" / "data")


def test_never_overwrites_without_overwrite(tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    prepare(corpus[:1], str(out), tokenizer=tokenizer_dir, workers=1, progress=False)
    before = _files(out)
    with pytest.raises(ValueError, match="already holds a prepared dataset: pass --overwrite"):
        prepare(corpus, str(out), tokenizer=tokenizer_dir, workers=1, progress=False)
    assert _files(out) == before
    prepare(corpus, str(out), tokenizer=tokenizer_dir, workers=1, overwrite=True, progress=False)
    assert json.loads((out / MANIFEST).read_text())["documents"] == 80 + 30 + 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files"):
        prepare(corpus, str(other), tokenizer=tokenizer_dir, workers=1, progress=False)
    assert _files(other) == {"notes.txt": b"mine"}


@pytest.mark.parametrize("case", ["missing", "empty file", "empty folder", "bad jsonl", "no special tokens"])
def test_bad_input_is_refused_and_nothing_written(tmp_path, tokenizer_dir, case):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = tokenizer_dir
    if case == "missing":
        corpus, error, match = [str(tmp_path / "nowhere.txt")], CorpusError, "does not exist: pass existing files"
    elif case == "empty file":
        (tmp_path / "empty.txt").write_text("\n\n")
        corpus, error, match = [str(tmp_path / "empty.txt")], CorpusError, "contains no text: pass non-empty files"
    elif case == "empty folder":
        (tmp_path / "folder").mkdir()
        corpus, error, match = [str(tmp_path / "folder")], CorpusError, "holds no files"
    elif case == "bad jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
        corpus, error, match = [str(tmp_path / "bad.jsonl")], CorpusError, r"bad.jsonl: the line at byte 17 .*'text'"
    else:
        bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
        bare.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="[UNK]").save_pretrained(tmp_path / "bare")
        corpus, tokenizer = [write_corpus(tmp_path / "corpus")], str(tmp_path / "bare")
        error, match = ValueError, r"has no \[CLS\].*\[MASK\].*\[PAD\]"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(error, match=match):
        prepare(corpus, str(tmp_path / "new" / "data"), tokenizer=tokenizer, workers=1, progress=False)
    assert sorted(tmp_path.rglob("*")) == before


def _prepared(tmp_path, tokenizer_dir) -> pathlib.Path:
    prepare(_corpus(tmp_path / "corpus"), str(tmp_path / "data"), tokenizer=tokenizer_dir, workers=1,
            shard_tokens=800, progress=False)
    return tmp_path / "data"


def test_damaged_data_names_the_file(tmp_path, tokenizer_dir):
    data = _prepared(tmp_path, tokenizer_dir)
    shard = data / "shard-00001.tokens.bin"
    content = shard.read_bytes()
    shard.write_bytes(content[:-2])
    with pytest.raises(DataError, match=r"shard-00001.tokens.bin is truncated.*--overwrite"):
        open_dataset(data)
    shard.write_bytes(content[:10] + bytes([content[10] ^ 1]) + content[11:])
    with pytest.raises(DataError, match=r"shard-00001.tokens.bin is corrupt"):
        open_dataset(data)
    shard.write_bytes(content)
    open_dataset(data)
    (data / MANIFEST).unlink()
    with pytest.raises(DataError, match="not a finished prepared dataset"):
        open_dataset(data)


def test_data_made_with_another_tokenizer_is_refused(tmp_path, tokenizer_dir):
    from electra_triton.pretrain.data import resolve_corpus as resolve
    from electra_triton.pretrain.data import train_tokenizer

    data = _prepared(tmp_path, tokenizer_dir)
    other = train_tokenizer(resolve([write_corpus(tmp_path / "other", seed=5)]), 120, 1000, 64)
    with pytest.raises(DataError, match="another tokenizer.*leave --tokenizer out"):
        open_dataset(data, other)


def test_cli(tmp_path, tokenizer_dir, capsys):
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    args = ["prepare", "--corpus", *corpus, "--tokenizer", tokenizer_dir, "--output-dir", str(out), "--workers", "1"]
    assert cli.main(args) == 0
    assert f"train with: electra-triton pretrain --data {out}" in capsys.readouterr().out
    assert cli.main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0
    tokens = np.fromfile(out / "shard-00000.tokens.bin", dtype=np.uint16)
    assert len(tokens) == json.loads((out / MANIFEST).read_text())["tokens"]


@pytest.mark.slow
def test_data_benchmark_toy_run(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from benchmarks import data as data_benchmark

    assert data_benchmark.main(["--toy", "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "data.json").read_text())
    rows = {(r["corpus"], r["max_seq_len"], r["source"], r["packing"]): r for r in result["loader"]}
    assert len(rows) == 16 and all(r["real_tokens_per_s"] > 0 and 0 < r["fill"] <= 1 for r in rows.values())
    for corpus in ("stdlib", "long documents"):
        for length in (128, 512):
            packed, padded = rows[(corpus, length, "shards", True)], rows[(corpus, length, "shards", False)]
            assert packed["fill"] > 0.95 and packed["fill"] > padded["fill"]
    scaling = result["prepare_scaling"]
    assert scaling["wall_speedup"] > 0 and scaling["two_workers"]["cpu_workers"] > 0
    assert "real tokens/s" in capsys.readouterr().out
