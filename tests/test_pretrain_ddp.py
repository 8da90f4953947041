"""Scale-out on CPU with the kernels on (Triton interpreter): 2 processes over gloo, DDP and then FSDP2, each rank on
its own data shard, rank 0 writing. Per mode, one uninterrupted run and one stopped by a SIGTERM after step 2 and
resumed: the ranks end with identical weights, FSDP with the weights DDP reaches, every fused forward ran on every
rank, and the resumed run reproduces the uninterrupted losses and weights exactly. One run's outputs serve every
assertion (importing torch and interpreting the kernels dominate the time)."""

import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_pretrain_data import MICRO_GENERATOR, MICRO_MODEL, micro_config
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from electra_triton.ops import _dispatch
from electra_triton.pretrain import run
from electra_triton.pretrain.distributed import RunError
from electra_triton.pretrain.model import ElectraPretrainer
from electra_triton.pretrain.step import TrainStep
from electra_triton.pretrain.train import Trainer
from electra_triton.tracing import OpTrace

MODES = ("ddp", "fsdp")
STOP_AFTER, STEPS = 2, 3
# Head dim 32, the attention kernel's smallest (the micro preset's 16 would leave attention on transformers' path).
KERNEL_DISCRIMINATOR = {**MICRO_MODEL, "num_attention_heads": 1}
KERNEL_GENERATOR = {**MICRO_GENERATOR, "hidden_size": 32, "intermediate_size": 64}
FUSED_FORWARDS = {"electra_triton::attention_qkvpacked_forward", "electra_triton::gelu_linear_forward",
                  "electra_triton::dropout_add_layer_norm_forward", "electra_triton::rtd_loss_forward",
                  "electra_triton::generator_head_forward"}


def kernel_config(folder, **overrides):
    fields = {"max_steps": STEPS, "save_every": STOP_AFTER, "kernels": "triton", "discriminator": KERNEL_DISCRIMINATOR,
              "generator": KERNEL_GENERATOR}
    return micro_config(folder, **{**fields, **overrides})


def _record_ops_of_first_step(ran: set[str]) -> None:
    call = TrainStep.__call__

    def traced(self, batches):
        if ran:
            return call(self, batches)
        with OpTrace() as trace:
            result = call(self, batches)
        ran.update(name for name in trace.counts() if name.startswith("electra_triton::"))
        return result

    TrainStep.__call__ = traced


def _dump_final_state(rank: int, ran: set[str]) -> None:
    save_final = Trainer.save_final

    def save_final_and_dump(self):
        save_final(self)
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))  # all ranks
        first = self.data.next_batch()["input_ids"][0]
        # Evaluation: each rank its own held-out documents, the sums reduced over both (a collective: all ranks).
        own_tokens = sum(int(batch["attention_mask"].sum()) for batch in self.evaluator.batches)
        reduced_tokens = self.evaluator.evaluate(self.model, self.autocast).token_count()
        torch.save({"state": state, "next_example": first, "ran": set(ran), "own_tokens": own_tokens,
                    "reduced_tokens": reduced_tokens}, self.out.parent / f"rank{rank}.pt")

    Trainer.save_final = save_final_and_dump


def _sigterm_rank0_in_step(rank: int, step: int) -> None:
    forward, calls = ElectraPretrainer.forward, []

    def forward_and_signal(self, *args, **kwargs):
        calls.append(1)
        if rank == 0 and len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)  # rank 1 learns of it through the stop flag's all-reduce
        return forward(self, *args, **kwargs)

    ElectraPretrainer.forward = forward_and_signal


def _worker(rank: int, world_size: int, ports: list[int], tmp_path) -> None:
    assert _dispatch.INTERPRET  # TRITON_INTERPRET=1 reached the worker before its imports
    torch.set_num_threads(1)
    ran: set[str] = set()
    _record_ops_of_first_step(ran)
    _dump_final_state(rank, ran)
    forward = ElectraPretrainer.forward
    ports = iter(ports)
    for mode in MODES:
        def launch(cfg):
            os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(next(ports))})
            return run(cfg)

        ran.clear()
        assert launch(kernel_config(tmp_path / mode / "straight", fsdp=mode == "fsdp")) == 0
        _sigterm_rank0_in_step(rank, STOP_AFTER)
        resumed = kernel_config(tmp_path / mode / "resumed", fsdp=mode == "fsdp")
        assert launch(resumed) == 128 + signal.SIGTERM
        ElectraPretrainer.forward = forward
        resumed.resume = True
        assert launch(resumed) == 0


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _losses(out) -> list[dict]:
    """The training rows of metrics.jsonl (held-out evaluation rows, where written, say "split": "eval")."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("split", "train") == "train"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("two-process")
    mp.spawn(_worker, args=(2, _free_ports(3 * len(MODES)), tmp_path), nprocs=2, join=True)
    return tmp_path


def _ranks(folder) -> list[dict]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_two_processes_kernels_on_identical_ranks_own_shards(two_process_runs, mode):
    ranks = _ranks(two_process_runs / mode / "straight")
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for rank in ranks:
        assert rank["ran"] >= FUSED_FORWARDS, FUSED_FORWARDS - rank["ran"]
    assert not torch.equal(ranks[0]["next_example"], ranks[1]["next_example"])  # each rank on its own shard
    own = [rank["own_tokens"] for rank in ranks]  # held-out evaluation: each rank its documents, sums reduced
    assert min(own) > 0 and ranks[0]["reduced_tokens"] == ranks[1]["reduced_tokens"] == sum(own)
    out = two_process_runs / mode / "straight" / "out"
    assert (out / "discriminator" / "config.json").exists() and (out / "checkpoints" / f"step-{STEPS}").is_dir()
    assert [row["step"] for row in _losses(out)] == list(range(1, STEPS + 1))  # rank 0 only
    state = torch.load(out / "checkpoints" / f"step-{STEPS}" / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["data"]) == 2 and state["data"][0] != state["data"][1]


@pytest.mark.slow
def test_fsdp_and_ddp_reach_the_same_weights(two_process_runs):
    ddp, fsdp = (_ranks(two_process_runs / mode / "straight")[0]["state"] for mode in MODES)
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_sigterm_and_resume_reproduce_the_uninterrupted_run(two_process_runs, mode):
    # The checkpoint holds the full (unsharded) model and optimizer state, under FSDP gathered to rank 0.
    straight, resumed = two_process_runs / mode / "straight", two_process_runs / mode / "resumed"
    keys = ("step", "loss", "mlm_loss", "rtd_loss", "grad_norm", "lr")
    assert [{k: row[k] for k in keys} for row in _losses(resumed / "out")] == \
        [{k: row[k] for k in keys} for row in _losses(straight / "out")]  # bit-exact
    for rank_straight, rank_resumed in zip(_ranks(straight), _ranks(resumed), strict=True):
        for key, value in rank_straight["state"].items():
            assert torch.equal(rank_resumed["state"][key], value), key
        assert torch.equal(rank_resumed["next_example"], rank_straight["next_example"])  # same data position


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused_naming_both(two_process_runs):
    folder = two_process_runs / "ddp" / "resumed"
    with pytest.raises(RunError, match=r"written by 2 processes and this run has 1"):
        run(kernel_config(folder, resume=True, max_steps=STEPS + 1))
