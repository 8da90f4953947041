"""Checkpoints and resume: an interrupted (SIGINT) and resumed run reproduces the uninterrupted per-step losses exactly
(CPU, reference ops, fp32); checkpoints are atomic, pruned, verified, and broken ones are skipped with a message."""

import json
import os
import signal

import pytest
import torch
from test_pretrain_data import micro_config

from electra_triton.pretrain import checkpoint as ckpt
from electra_triton.pretrain import run
from electra_triton.pretrain.model import ElectraPretrainer
from electra_triton.pretrain.train import RunError


def _losses(output_dir) -> list[tuple[int, float, float, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"], m["mlm_loss"], m["rtd_loss"]) for m in map(json.loads, lines)
            if m["split"] == "train"]


def _evals(output_dir) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["split"] == "eval"]


def test_interrupted_and_resumed_run_reproduces_the_losses(tmp_path, monkeypatch):
    straight = micro_config(tmp_path / "a", max_steps=6, save_every=4)
    assert run(straight) == 0

    calls = []
    forward = ElectraPretrainer.forward

    def interrupt_in_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3: checkpoint after it, then exit
        return forward(self, *args, **kwargs)

    interrupted = micro_config(tmp_path / "b", max_steps=6, save_every=4)
    with monkeypatch.context() as patch:
        patch.setattr(ElectraPretrainer, "forward", interrupt_in_step_3)
        assert run(interrupted) == 128 + signal.SIGINT
    out = tmp_path / "b" / "out"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-3"]
    assert not (out / "discriminator").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    interrupted.resume = True
    assert run(interrupted) == 0
    expected = _losses(tmp_path / "a" / "out")
    assert [m[0] for m in expected] == [1, 2, 3, 4, 5, 6]
    assert _losses(out) == expected  # bit-exact
    assert _evals(out) == _evals(tmp_path / "a" / "out") and len(_evals(out)) == 1  # held-out eval at the end
    final = torch.load(ckpt.list_checkpoints(out)[-1] / "model.pt")
    reference = torch.load(ckpt.list_checkpoints(tmp_path / "a" / "out")[-1] / "model.pt")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_checkpoints_are_atomic_pruned_and_verified(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, {"model": {"w": torch.full((3,), float(step))}, "state": {}}, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-3", "step-4", "step-5"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # A save killed half-way leaves a temporary folder, never a step-N one: ignored.
    (tmp_path / "checkpoints" / ".tmp-step-6-123").mkdir()
    # A step folder without manifest (copied by hand, disk full...) and one with a corrupted file: both skipped.
    (tmp_path / "checkpoints" / "step-7").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "step-7" / "model.pt")
    model_file = tmp_path / "checkpoints" / "step-5" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[-5] ^= 0xFF
    model_file.write_bytes(bytes(data))
    messages = []
    found = ckpt.newest_valid_checkpoint(tmp_path, report=messages.append)
    assert found.name == "step-4"
    assert "step-7" in messages[0] and "no manifest.json" in messages[0]
    assert "step-5" in messages[1] and "model.pt does not match its checksum" in messages[1]
    assert torch.load(found / "model.pt")["w"][0] == 4


def test_resume_skips_a_corrupt_checkpoint(tmp_path, capsys):
    cfg = micro_config(tmp_path, max_steps=4, save_every=2, log_every=2)
    assert run(cfg) == 0
    newest = ckpt.list_checkpoints(cfg.output_dir)[-1]
    assert newest.name == "step-4"
    (newest / "optimizer.pt").write_bytes(b"truncated")
    cfg.resume, cfg.max_steps = True, 5
    assert run(cfg) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-4" in err and "continuing from" in err and "step-2" in err
    assert [m[0] for m in _losses(tmp_path / "out")] == [2, 4, 5]  # metrics after step 2 were rewritten


def test_existing_run_without_resume_is_refused(tmp_path):
    cfg = micro_config(tmp_path, max_steps=2)
    assert run(cfg) == 0
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(RunError, match=r"already holds another run .*step-2.*--resume.*another --output-dir"):
        run(micro_config(tmp_path, max_steps=3))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing overwritten
