"""A patched model under DistributedDataParallel: 2 CPU processes (gloo) match one process on the whole batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import ElectraConfig, ElectraForPreTraining

import electra_triton

STEPS = 2


def _model() -> ElectraForPreTraining:
    torch.manual_seed(0)
    config = ElectraConfig(
        vocab_size=64, embedding_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return electra_triton.patch(ElectraForPreTraining(config))


def _batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(3, 64, (4, 8), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        mask[3, 5:] = 0  # 13 real tokens per rank
        labels = torch.randint(0, 2, (4, 8), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _train(model, batches, rank=0, world=1) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for batch in batches:
        shard = {k: v[rank * 4 // world:(rank + 1) * 4 // world] for k, v in batch.items()}
        loss = model(**shard).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        _train(model, _batches(), rank, 2)
        if rank == 0:
            torch.save(model.module.state_dict(), os.path.join(folder, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes_match_one(tmp_path):
    # Each rank's loss is the mean over its own active tokens; with equal active counts per shard, DDP's gradient
    # average equals the single-process gradient of the mean over the whole batch.
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _model()
    batches = _batches()
    _train(single, batches)
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
