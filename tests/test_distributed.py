"""Distributed pre-training as launched for real: two torchrun "nodes" of one process each on 127.0.0.1 (the README's
multi-node invocation), a failing or stuck rank that stops every rank within a bounded time, and bad launches that
are refused before any work starts."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_pretrain_data import MICRO_GENERATOR, MICRO_MODEL, micro_config, write_corpus
from test_pretrain_ddp import FUSED_FORWARDS, KERNEL_DISCRIMINATOR, KERNEL_GENERATOR, STEPS, _losses

from electra_triton.pretrain import distributed, parse_args
from electra_triton.pretrain.data import resolve_corpus
from electra_triton.pretrain.train import main

TESTS = pathlib.Path(__file__).parent
ROOT = TESTS.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_flags(folder: pathlib.Path, kernels: str, discriminator: dict, generator: dict, **fields) -> list[str]:
    """The command line of micro_config(folder, ...)."""
    cfg = micro_config(folder, kernels=kernels, discriminator=discriminator, generator=generator, **fields)
    flags = ["--corpus", *cfg.corpus]
    for name in ("output_dir", "vocab_size", "max_steps", "batch_size", "max_seq_len", "lr", "warmup_steps",
                 "save_every", "log_every", "kernels", "device", "shuffle_buffer", "dist_timeout_s"):
        flags += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    for prefix, model in (("disc", discriminator), ("gen", generator)):
        for name, value in model.items():
            flags += [f"--{prefix}-{name.replace('_', '-')}", str(value)]
    assert parse_args(flags) == cfg  # the flags say what micro_config says
    return flags


def _environment(**extra) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_two_torchrun_nodes_train_with_the_kernels_on(tmp_path):
    port = _free_port()
    flags = cli_flags(tmp_path, "triton", KERNEL_DISCRIMINATOR, KERNEL_GENERATOR, max_steps=STEPS)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "pretrain_worker", *flags],
        env=_environment(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for rank in ranks:
        assert rank["ran"] >= FUSED_FORWARDS, FUSED_FORWARDS - rank["ran"]
    assert not torch.equal(ranks[0]["next_example"], ranks[1]["next_example"])  # each rank on its own shard
    out = tmp_path / "out"  # one shared output folder: rank 0 writes, every rank can read
    assert (out / "discriminator" / "config.json").exists() and not (out / ".shared-check").exists()
    assert [row["step"] for row in _losses(out)] == list(range(1, STEPS + 1))  # rank 0 only


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_or_stuck_rank_stops_every_rank(tmp_path, how):
    # Plain processes (no torchrun agent to kill the others): the run itself must stop them. A rank that raises
    # stops the others at once; a stuck one is ended by --dist-timeout-s on the others.
    timeout_s = 20
    flags = cli_flags(tmp_path, "reference", MICRO_MODEL, MICRO_GENERATOR, dist_timeout_s=timeout_s)
    launch = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
              "WORKER_FAIL": f"1:2:{how}"}
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-m", "pretrain_worker", *flags],
                              env=_environment(**launch, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    errors = [rank.communicate(timeout=300)[1] for rank in ranks]
    elapsed = time.monotonic() - started
    assert all(rank.returncode != 0 for rank in ranks), errors
    if how == "raise":
        assert "rank 1" in errors[0] and "bad data on rank 1 in step 2" in errors[0], errors[0]
    else:  # rank 0's collective timed out; rank 1, stuck, is stopped by rank 0's failure
        assert "rank 0" in errors[1] and "failed" in errors[1], errors[1]
    assert elapsed < 240  # imports and set-up included; hanging until a default 10-minute timeout would fail this


def test_world_size_without_rendezvous_address_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(["--corpus", write_corpus(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "MASTER_ADDR and MASTER_PORT are not set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_more_processes_than_documents_is_refused(tmp_path):
    sources = resolve_corpus([write_corpus(tmp_path, documents=3)])
    distributed.check_enough_documents(sources, 3)
    with pytest.raises(distributed.RunError, match="has 3 document.*for 4 processes"):
        distributed.check_enough_documents(sources, 4)


def test_fsdp_without_fully_shard_is_refused(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fsdp2(name, *args, **kwargs):
        if name.startswith("torch.distributed") and "fsdp" in name:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fsdp2)
    with pytest.raises(distributed.RunError, match="--fsdp needs FSDP2"):
        distributed.check_fsdp_available()


def test_dist_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--dist-timeout-s must be > 0"):
        micro_config(tmp_path, dist_timeout_s=0).resolved()


def test_output_folder_that_another_node_cannot_see_is_refused(tmp_path, monkeypatch):
    # Rank 1 of 2 on a node whose --output-dir is its own (rank 0's token file never appears there). The collectives
    # are played by hand: rank 0's token arrives by broadcast, the gather returns what each rank saw.
    gathered = {}

    def gather(into, mine):
        gathered["rank 1"] = mine
        into[:] = [None, mine]

    monkeypatch.setattr(distributed.dist, "broadcast_object_list", lambda token, src: token.__setitem__(0, "f00d"))
    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: None)
    runtime = distributed.Runtime(rank=1, world_size=2, device=torch.device("cpu"), distributed=True)
    with pytest.raises(distributed.RunError, match=r"is not shared: rank 1 on \S+ cannot see"):
        distributed.check_shared_output(runtime, tmp_path)
    (tmp_path / ".shared-check").write_text("f00d")  # a shared folder: rank 0's token is there
    distributed.check_shared_output(runtime, tmp_path)
    assert gathered["rank 1"] is None
