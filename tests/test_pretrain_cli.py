"""`electra-triton pretrain` end to end in a subprocess (a few micro-model steps), its outputs loadable by plain
transformers; and the command's refusals (exit code 2, a message naming the fix)."""

import json
import os
import subprocess
import sys

import yaml
from test_pretrain_data import micro_config
from transformers import AutoTokenizer, ElectraForMaskedLM, ElectraForPreTraining

from electra_triton.ops import _dispatch
from electra_triton.pretrain import main


def test_cli_end_to_end(tmp_path):
    cfg = micro_config(tmp_path).to_json()
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({k: cfg[k] for k in ("corpus", "vocab_size", "discriminator", "generator",
                                                              "shuffle_buffer", "warmup_steps")}))
    out = tmp_path / "run"
    flags = ["--config", str(config_file), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
             "--grad-accum", "2", "--max-seq-len", "32", "--lr", "1e-3", "--seed", "1", "--save-every", "2",
             "--log-every", "1", "--kernels", "reference", "--device", "cpu"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-m", "electra_triton.cli", "pretrain", *flags], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"discriminator  {out / 'discriminator'}" in result.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3]
    assert [m["step"] for m in metrics if m["split"] == "eval"] == [3]  # held-out evaluation at the end
    assert set(metrics[0]) >= {"step", "loss", "mlm_loss", "rtd_loss", "mlm_acc", "rtd_acc", "lr", "tokens_per_s"}
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-2", "step-3"]

    discriminator = ElectraForPreTraining.from_pretrained(out / "discriminator")
    generator = ElectraForMaskedLM.from_pretrained(out / "generator")
    tokenizer = AutoTokenizer.from_pretrained(out / "discriminator")
    assert discriminator.config.hidden_size == 32 and generator.config.hidden_size == 16
    assert generator.config.vocab_size == len(tokenizer) == discriminator.config.vocab_size
    assert tokenizer.mask_token == "[MASK]"
    # The shared embeddings were saved with both models, identical.
    assert discriminator.electra.embeddings.word_embeddings.weight.equal(
        generator.electra.embeddings.word_embeddings.weight)
    inputs = tokenizer("w1 w2 alpha beta", return_tensors="pt")
    assert discriminator(**inputs).logits.shape == inputs["input_ids"].shape

    # Without --resume the same command refuses to touch the run; --resume continues it from its saved config.
    assert main(flags) == 2
    assert main(["--output-dir", str(out), "--resume", "--max-steps", "4"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_cli_errors_name_the_fix(tmp_path, capsys, monkeypatch):
    assert main(["--preset", "tiny", "--max-seq-len", "512", "--output-dir", str(tmp_path / "x")]) == 2
    assert "max_position_embeddings (128)" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["--corpus", str(empty), "--output-dir", str(tmp_path / "y"), "--kernels", "reference"]) == 2
    assert "contains no text: pass non-empty files to --corpus" in capsys.readouterr().err
    assert main(["--corpus", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(_dispatch, "INTERPRET", False)  # as on a CPU machine outside the test harness
    assert main(["--kernels", "triton", "--device", "cpu", "--output-dir", str(tmp_path / "w")]) == 2
    assert "--kernels triton needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
