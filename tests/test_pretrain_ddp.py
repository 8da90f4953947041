"""Scale-out on CPU: 2 processes over gloo, DDP and then FSDP2, each rank on its own data shard, rank 0 writing. The
ranks must end with identical weights, and FSDP with the weights DDP reaches."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_pretrain_data import micro_config
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from electra_triton.pretrain import run
from electra_triton.pretrain.train import Trainer


def _worker(rank: int, world_size: int, ports: list[int], tmp_path) -> None:
    torch.set_num_threads(1)
    save_final = Trainer.save_final

    def save_final_and_dump(self):
        save_final(self)
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))  # all ranks
        first = self.data.next_batch()["input_ids"][0]
        # Evaluation: each rank its own held-out documents, the sums reduced over both (a collective: all ranks).
        own_tokens = sum(int(batch["attention_mask"].sum()) for batch in self.evaluator.batches)
        reduced_tokens = self.evaluator.evaluate(self.model, self.autocast).token_count()
        torch.save({"state": state, "next_example": first, "own_tokens": own_tokens, "reduced_tokens": reduced_tokens},
                   self.out.parent / f"rank{rank}.pt")

    Trainer.save_final = save_final_and_dump
    # One pair of processes runs both (importing torch and transformers dominates the test's time).
    for mode, port in zip(("ddp", "fsdp"), ports, strict=True):
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        assert run(micro_config(tmp_path / mode, max_steps=3, save_every=2, fsdp=mode == "fsdp")) == 0


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_two_cpu_processes_ddp_and_fsdp(tmp_path):
    mp.spawn(_worker, args=(2, _free_ports(2), tmp_path), nprocs=2, join=True)
    final, evals = {}, {}
    for mode in ("ddp", "fsdp"):
        ranks = [torch.load(tmp_path / mode / f"rank{r}.pt", weights_only=False) for r in range(2)]
        assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), (mode, key)
        assert not torch.equal(ranks[0]["next_example"], ranks[1]["next_example"])  # each rank on its own shard
        out = tmp_path / mode / "out"
        assert (out / "discriminator" / "config.json").exists() and (out / "checkpoints" / "step-3").is_dir()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # rank 0 only
        assert [(row["step"], row["split"]) for row in rows] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
        own = [ranks[r]["own_tokens"] for r in range(2)]
        assert min(own) > 0 and ranks[0]["reduced_tokens"] == ranks[1]["reduced_tokens"] == sum(own)
        evals[mode] = rows[-1]
        state = torch.load(out / "checkpoints" / "step-3" / "state.pt", weights_only=False)
        assert len(state["data"]) == 2 and state["data"][0] != state["data"][1]  # both ranks' data positions
        final[mode] = ranks[0]["state"]
    for key, value in final["ddp"].items():
        torch.testing.assert_close(final["fsdp"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert evals["fsdp"] == pytest.approx(evals["ddp"], rel=1e-3)
