"""Pre-training data and config: packing, determinism, rank sharding, exact resume of the stream, bad input.

Also home of the helpers the other test_pretrain_* files import (a small synthetic corpus, a micro model config).
"""

import builtins
import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from electra_triton.pretrain import PretrainConfig, parse_args
from electra_triton.pretrain.data import (
    CorpusError,
    ExampleStream,
    load_tokenizer,
    read_documents,
    resolve_corpus,
    train_tokenizer,
)

WORDS = [f"w{i}" for i in range(150)] + ["alpha", "beta", "gamma", "delta", "electra", "token", "model", "text"]


def write_corpus(folder, documents: int = 60, seed: int = 0) -> str:
    """A text file of `documents` documents (blank-line separated) of random sentences; returns its path."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.txt"
    docs = [
        "\n".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 14))) for _ in range(rng.randint(1, 6)))
        for _ in range(documents)
    ]
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


MICRO_MODEL = {"embedding_size": 16, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "intermediate_size": 64, "max_position_embeddings": 64}
MICRO_GENERATOR = {**MICRO_MODEL, "hidden_size": 16, "num_attention_heads": 1, "intermediate_size": 32}


def micro_config(tmp_path, **overrides) -> PretrainConfig:
    """A model and run small enough for a step to take milliseconds on a CPU, on the reference ops in fp32."""
    fields = {
        "preset": "tiny", "corpus": [write_corpus(tmp_path / "corpus")], "output_dir": str(tmp_path / "out"),
        "vocab_size": 200, "max_steps": 4, "batch_size": 4, "max_seq_len": 32, "lr": 1e-3, "warmup_steps": 1,
        "save_every": 2, "log_every": 1, "kernels": "reference", "device": "cpu", "shuffle_buffer": 8,
        "discriminator": MICRO_MODEL, "generator": MICRO_GENERATOR,
    }
    return PretrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    sources = resolve_corpus([write_corpus(folder)])
    return sources, train_tokenizer(sources, 200, 10_000, 64)


def _stream(corpus_and_tokenizer, **kwargs) -> ExampleStream:
    sources, tokenizer = corpus_and_tokenizer
    return ExampleStream(sources, tokenizer, kwargs.pop("max_seq_len", 32), shuffle_buffer=8, **kwargs)


def test_packing_builds_cls_a_sep_b_sep(corpus_and_tokenizer):
    _, tokenizer = corpus_and_tokenizer
    batch = _stream(corpus_and_tokenizer).next_batch(32)
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert ids.shape == (32, 32)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    lengths = mask.sum(1)
    assert (ids.gather(1, lengths[:, None] - 1) == tokenizer.sep_token_id).all()
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert (types[mask == 0] == 0).all()
    assert lengths.float().mean() > 24  # packed: sentences are accumulated up to the target length
    pairs = 0
    for row in range(32):
        seps = (ids[row] == tokenizer.sep_token_id).nonzero().flatten().tolist()
        assert len(seps) in (1, 2)
        if len(seps) == 2:
            pairs += 1
            assert (types[row, seps[0] + 1: seps[1] + 1] == 1).all() and (types[row, : seps[0] + 1] == 0).all()
    assert pairs > 16  # mostly A/B pairs, ~10% single segments


def test_stream_is_deterministic_and_seeded(corpus_and_tokenizer):
    first = _stream(corpus_and_tokenizer, seed=1).next_batch(16)["input_ids"]
    again = _stream(corpus_and_tokenizer, seed=1).next_batch(16)["input_ids"]
    other = _stream(corpus_and_tokenizer, seed=2).next_batch(16)["input_ids"]
    assert first.equal(again)
    assert not first.equal(other)


def test_ranks_read_disjoint_documents(corpus_and_tokenizer):
    shards = [_stream(corpus_and_tokenizer, rank=r, world_size=2) for r in range(2)]
    rows = [{tuple(row.tolist()) for row in s.next_batch(24)["input_ids"]} for s in shards]
    assert not rows[0] & rows[1]


def test_stream_resumes_at_the_exact_example(corpus_and_tokenizer):
    original = _stream(corpus_and_tokenizer, seed=3)
    for _ in range(7):  # past the end of the corpus: a new epoch
        original.next_batch(16)
    state = json.loads(json.dumps(original.state_dict()))  # what a checkpoint stores
    resumed = _stream(corpus_and_tokenizer, seed=3)
    resumed.load_state_dict(state)
    assert original.epoch >= 1
    for _ in range(3):
        assert original.next_batch(16)["input_ids"].equal(resumed.next_batch(16)["input_ids"])


def test_formats_text_jsonl_and_folders(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("one\ntwo\n\n\nthree\n")
    (tmp_path / "docs" / "b.jsonl").write_text('{"text": "four\\nfive"}\n\n{"text": "six"}\n')
    sources = resolve_corpus([str(tmp_path / "docs")])
    assert [kind for kind, _ in sources] == ["text", "jsonl"]
    assert [d for d, _ in read_documents(*sources[0])] == [["one", "two"], ["three"]]
    assert [d for d, _ in read_documents(*sources[1])] == [["four", "five"], ["six"]]
    # A document's end position is where reading resumes.
    _, end = next(read_documents(*sources[0]))
    assert [d for d, _ in read_documents(*sources[0], end)] == [["three"]]
    builtin = resolve_corpus(["stdlib"])
    assert builtin and all(kind == "pydoc" for kind, _ in builtin)


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl: line 2.*'text'"):
        list(read_documents("jsonl", str(path)))


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    sources = resolve_corpus([str(empty)])
    with pytest.raises(CorpusError, match="contains no text: pass non-empty files to --corpus"):
        train_tokenizer(sources, 100, 100, 32)
    (tmp_path / "none").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        resolve_corpus([str(tmp_path / "none")])
    with pytest.raises(CorpusError, match="does not exist"):
        resolve_corpus([str(tmp_path / "missing.txt")])


def test_empty_corpus_stream_is_a_clear_error(tmp_path, corpus_and_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    stream = ExampleStream(resolve_corpus([str(empty)]), corpus_and_tokenizer[1], 32)
    with pytest.raises(CorpusError, match="yielded no text"):
        stream.next_batch(1)


def test_unreadable_file_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("text\n")
    real_open = builtins.open

    def deny(file, *args, **kwargs):  # chmod does not stop root, so refuse the read here
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(CorpusError, match=r"cannot read corpus file .*secret.txt.*Permission denied.*permissions"):
        resolve_corpus([str(tmp_path)])


def test_tokenizer_without_special_tokens_is_a_clear_error(tmp_path):
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["some words here", "and more words"], trainers.WordPieceTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"no \[CLS\].*\[SEP\].*\[MASK\].*leave --tokenizer out"):
        load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="is not a folder"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_max_seq_len_above_position_embeddings_is_a_clear_error():
    with pytest.raises(ValueError, match=r"--max-seq-len 256 exceeds .*max_position_embeddings \(128\).*--max-seq-len"):
        PretrainConfig(preset="tiny", max_seq_len=256).resolved()


def test_config_precedence_preset_file_flags(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "preset: small\nlr: 0.001\nbatch_size: 8\ndiscriminator:\n  num_hidden_layers: 3\n"
    )
    cfg = parse_args(["--config", str(tmp_path / "run.yaml"), "--batch-size", "4", "--gen-num-hidden-layers", "2"])
    cfg = cfg.resolved()
    assert (cfg.preset, cfg.lr, cfg.batch_size, cfg.max_seq_len) == ("small", 0.001, 4, 128)
    assert cfg.model_config("discriminator")["num_hidden_layers"] == 3
    assert cfg.model_config("generator")["num_hidden_layers"] == 2
    assert cfg.model_config("discriminator")["hidden_size"] == 256
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown fields"):
        parse_args(["--config", str(tmp_path / "bad.json")])
    defaults = parse_args([]).resolved()
    assert (defaults.preset, defaults.corpus, defaults.output_dir) == ("tiny", ["stdlib"], "electra-tiny")


def test_sampling_temperature_is_per_preset_and_a_flag_overrides_it():
    # tiny samples flatter replacements so that its short run's discriminator learns (see TRAINING_DEFAULTS).
    assert parse_args([]).resolved().temperature == 2.0
    assert parse_args(["--preset", "small"]).resolved().temperature == 1.0
    assert parse_args(["--temperature", "1"]).resolved().temperature == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Prepared shards (`pretrain --data`)


@pytest.fixture(scope="module")
def prepared(corpus_and_tokenizer, tmp_path_factory):
    from electra_triton.pretrain.prepare import prepare
    from electra_triton.pretrain.shards import open_dataset

    folder = tmp_path_factory.mktemp("prepared")
    corpus_and_tokenizer[1].save_pretrained(folder / "tokenizer")
    prepare([write_corpus(folder / "corpus")], str(folder / "data"), tokenizer=str(folder / "tokenizer"), workers=1,
            shard_tokens=600, progress=False)
    return open_dataset(folder / "data")


def _shard_batcher(data, packing=True, **kwargs):
    from electra_triton.pretrain.packing import Batcher
    from electra_triton.pretrain.shards import ShardExampleStream

    tokenizer = data.tokenizer
    stream = ShardExampleStream(data, kwargs.pop("max_seq_len", 32), shuffle_buffer=8, **kwargs)
    return Batcher(stream, stream.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                   packing=packing, pool_size=16)


def _documents_read(stream, examples: int) -> set[int]:
    """The documents a stream visits while producing `examples` examples."""
    for _ in range(examples):
        stream.next_example()
    return {int(d) for d in stream._epoch_documents[: stream.cursor]}


def test_shard_stream_builds_the_raw_streams_examples(prepared, corpus_and_tokenizer):
    """The same ExampleBuilder over the shards: with documents in corpus order and no shuffling, the shard stream's
    examples are the raw-text stream's (which reads the corpus in file order)."""
    from electra_triton.pretrain.shards import ShardExampleStream

    sources, tokenizer = corpus_and_tokenizer
    raw = ExampleStream(sources, tokenizer, 32, shuffle_buffer=1)
    shards = ShardExampleStream(prepared, 32, shuffle_buffer=1)
    shards._epoch_documents = shards.documents  # corpus order, as the single-file raw stream reads it
    for _ in range(40):
        first, second, _, _ = shards.materialize(shards.next_example())
        as_ids = ([int(i) for piece in first for i in piece], [int(i) for piece in second for i in piece])
        assert as_ids == raw.next_example()


def test_shard_stream_is_deterministic_rank_sharded_and_resumes(prepared):
    from electra_triton.pretrain.shards import ShardExampleStream

    first = _shard_batcher(prepared, seed=1).next_batch(8)["input_ids"]
    assert first.equal(_shard_batcher(prepared, seed=1).next_batch(8)["input_ids"])
    assert not first.equal(_shard_batcher(prepared, seed=2).next_batch(8)["input_ids"])

    ranks = [ShardExampleStream(prepared, 32, rank=r, world_size=2, shuffle_buffer=4) for r in range(2)]
    read = [_documents_read(stream, 20) for stream in ranks]
    assert read[0] and read[1] and not read[0] & read[1]

    original = _shard_batcher(prepared, seed=3)
    for _ in range(12):  # past the end of the data: a new epoch
        original.next_batch(8)
    assert original.stream.epoch >= 1
    state = json.loads(json.dumps(original.state_dict()))  # what a checkpoint stores
    resumed = _shard_batcher(prepared, seed=3)
    resumed.load_state_dict(state)
    for _ in range(3):
        expected, got = original.next_batch(8), resumed.next_batch(8)
        assert all(expected[k].equal(got[k]) for k in ("input_ids", "token_type_ids", "position_ids"))
    other_rank = ShardExampleStream(prepared, 32, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank 0 of 1.*same number of processes"):
        other_rank.load_state_dict(state["stream"])


def test_held_out_documents_are_the_first_k(prepared):
    from electra_triton.pretrain.shards import ShardExampleStream

    train = ShardExampleStream(prepared, 32, held_out_docs=10, split="train", shuffle_buffer=4)
    held_out = ShardExampleStream(prepared, 32, held_out_docs=10, split="eval", shuffle_buffer=4)
    assert min(_documents_read(train, 30)) >= 10
    assert _documents_read(held_out, 30) <= set(range(10))
    with pytest.raises(ValueError, match="held_out_docs"):
        ShardExampleStream(prepared, 32, held_out_docs=prepared.num_documents + 1)


def test_pretrain_from_prepared_data(tmp_path, prepared, capsys):
    from electra_triton.pretrain import run

    cfg = micro_config(tmp_path, corpus=None, data=str(prepared.path), max_steps=3, save_every=2)
    assert run(cfg) == 0
    out = capsys.readouterr()
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["split"] == "train"]
    assert all(0.9 < m["fill"] <= 1 and m["tokens_per_s"] > 0 for m in metrics)  # packed rows, real tokens only
    assert "packing: on" in out.err and "real tokens/s, fill" in out.out
    cfg.resume, cfg.max_steps = True, 4
    assert run(cfg) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if m["split"] == "train"] == [1, 2, 3, 4]
    assert [m["step"] for m in rows if m["split"] == "eval"] == [3, 4]  # held-out documents of the prepared data


def test_unpacked_fill_counts_padding(tmp_path, capsys):
    from electra_triton.pretrain import run

    assert run(micro_config(tmp_path, packing="off", max_steps=2)) == 0
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["fill"] < 0.9 for m in metrics if m["split"] == "train")  # short documents, one example per row
    assert "packing: off" in capsys.readouterr().err


def test_data_and_corpus_together_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--data .* and --corpus .* are both given: pass one"):
        micro_config(tmp_path, data=str(tmp_path)).resolved()
    assert not (tmp_path / "out").exists()
