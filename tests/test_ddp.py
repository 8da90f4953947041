"""A patched model, kernels on (Triton interpreter), under DistributedDataParallel and FSDP2: 2 CPU processes (gloo)
match one process on the whole batch, and every fused forward of the model ran in them."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import ElectraConfig, ElectraForPreTraining

import electra_triton
from electra_triton.tracing import OpTrace

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


# The model's fused forwards: attention on the packed QKV projection, LayerNorm (dropout + residual +
# LayerNorm), GELU-linear, RTD loss.
FUSED_FORWARDS = {"electra_triton::attention_qkvpacked_forward", "electra_triton::gelu_linear_forward",
                  "electra_triton::dropout_add_layer_norm_forward", "electra_triton::rtd_loss_forward"}


def _train(model, batches, rank=0, world=1) -> set[str]:
    """Train on this rank's rows of each batch; the names of the electra_triton ops that ran."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ran = set()
    for batch in batches:
        shard = {k: v[rank * 4 // world:(rank + 1) * 4 // world] for k, v in batch.items()}
        with OpTrace() as trace:
            loss = model(**shard).loss
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        ran |= {name for name in trace.counts() if name.startswith("electra_triton::")}
    return ran


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        ran = _train(model, _batches(), rank, 2)
        torch.save({"state": model.module.state_dict(), "ran": ran}, os.path.join(folder, f"ddp{rank}.pt"))
        sharded = _model()
        for layer in sharded.electra.encoder.layer:
            fully_shard(layer)
        fully_shard(sharded)
        ran = _train(sharded, _batches(), rank, 2)
        state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))  # collective
        torch.save({"state": state, "ran": ran}, os.path.join(folder, f"fsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_and_fsdp_two_cpu_processes_match_one(tmp_path):
    # Each rank's loss is the mean over its own active tokens; with equal active counts per shard, DDP's gradient
    # average equals the single-process gradient of the mean over the whole batch.
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _model()
    batches = _batches()
    _train(single, batches)
    for mode in ("ddp", "fsdp"):
        for rank in range(2):
            result = torch.load(tmp_path / f"{mode}{rank}.pt")
            assert result["ran"] >= FUSED_FORWARDS, (mode, rank, FUSED_FORWARDS - result["ran"])
            for name, value in single.state_dict().items():
                torch.testing.assert_close(result["state"][name], value, rtol=1e-4, atol=1e-5,
                                           msg=f"{mode} rank {rank} {name}")
