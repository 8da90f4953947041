"""The production step (electra_triton.pretrain.step): no host sync between logging steps, metrics read on demand,
the optimizer ELECTRA uses, gradient clipping on the device."""

import contextlib
import json

import pytest
import torch
from test_pretrain_model import CLS, MASK, PAD, SEP, _batch, _Tokenizer

import electra_triton
from electra_triton.pretrain.model import ElectraPretrainer, accepts_unpad_plan, build_models
from electra_triton.pretrain.step import (
    PRETRAIN_METRICS,
    TrainStep,
    autocast_for,
    build_optimizer,
    build_scheduler,
    to_device,
)
from electra_triton.tracing import OpTrace

# Head dim 32: the smallest the attention kernel takes, so the patched models run every fused op.
DISCRIMINATOR = {"embedding_size": 16, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 128, "max_position_embeddings": 64}
GENERATOR = {**DISCRIMINATOR, "hidden_size": 32, "num_attention_heads": 1, "intermediate_size": 64}


class _MetricModel(torch.nn.Module):
    """Returns what ElectraPretrainer returns, computed without any data-dependent host work."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.LayerNorm = torch.nn.LayerNorm(8)  # HF's name, which parameter_groups keys on

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = ((self.LayerNorm(self.linear(x)) - target) ** 2).mean()
        correct = (self.linear(x).argmax(-1) == target.argmax(-1)).sum()
        count = torch.full((), x.shape[0], dtype=torch.long)
        return {"loss": loss, "mlm_loss": loss.detach(), "rtd_loss": loss.detach() * 0, "mlm_correct": correct,
                "mlm_count": count, "rtd_correct": correct, "rtd_count": count}


def _metric_step(max_grad_norm: float = 1.0) -> tuple[_MetricModel, TrainStep]:
    model = _MetricModel()
    optimizer = build_optimizer(model, 1e-2, 0.01, (0.9, 0.999), 1e-6, torch.device("cpu"), fused=True)
    return model, TrainStep(model, optimizer, build_scheduler(optimizer, 2, 10), max_grad_norm=max_grad_norm)


def _metric_batches(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.randn(4, 8), "target": torch.randn(4, 8)} for _ in range(n)]


def test_loop_and_optimizer_take_no_host_sync():
    _, step = _metric_step()
    step(_metric_batches(1))  # the optimizer creates its state on the first step
    with OpTrace() as trace:
        step(_metric_batches(2))  # two micro-batches: accumulation, clipping, fused AdamW, schedule, metrics
    assert trace.host_syncs == 0, trace.sync_ops()
    counts = trace.counts()
    assert counts["aten::_fused_adamw_"] == len(step.optimizer.param_groups)  # one update per group, not per tensor
    values = step.read_metrics()  # the one sync, on logging steps (a device-to-host copy of the window)
    assert values["micro_steps"] == 3 and values["steps"] == 2


def test_metrics_are_the_sums_of_the_micro_batches():
    model, step = _metric_step(max_grad_norm=1e9)  # never clips: the logged norm is the plain norm
    batches = _metric_batches(3)
    expected_loss = sum(model(**b)["loss"].item() for b in batches)
    for b in batches:  # the gradient of the mean of the micro-batch losses
        (model(**b)["loss"] / 3).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    step(batches)
    values = step.read_metrics()
    assert values["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert values["mlm_count"] == 12 and values["micro_steps"] == 3 and values["steps"] == 1
    assert values["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert step.read_metrics()["micro_steps"] == 0  # reading empties the window


def test_clipping_caps_the_update():
    model, step = _metric_step(max_grad_norm=1e-3)
    step.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is then exactly the clipped gradient
    step.scheduler = None
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    step(_metric_batches(1))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(1e-3, rel=1e-3)
    assert step.read_metrics()["grad_norm"] > 1e-3  # the norm before clipping is logged


def test_fused_adamw_clips_inside_its_kernel_like_clip_grad_norm():
    # Fused AdamW divides the gradients by optimizer.grad_scale: the same update and the same (clipped) gradients
    # left behind as clip_grad_norm_ followed by the step, without clipping's own pass over the gradients.
    batches = _metric_batches(2)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = _MetricModel()
        optimizer = build_optimizer(model, 1e-2, 0.01, (0.9, 0.999), 1e-6, torch.device("cpu"), fused=fused)
        step = TrainStep(model, optimizer, None, max_grad_norm=1e-2)
        with OpTrace() as trace:
            for micro_batch in batches:
                step([micro_batch])
        results.append(([p.detach().clone() for p in model.parameters()], trace.counts(), step.read_metrics()))
    (fused_params, fused_ops, fused_metrics), (plain_params, _, plain_metrics) = results
    assert fused_ops["aten::_foreach_mul_"] == 0  # (foreach AdamW multiplies in its own update)
    for ours, theirs in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert fused_metrics["grad_norm"] == pytest.approx(plain_metrics["grad_norm"], rel=1e-5)
    assert fused_metrics["grad_norm"] > 1e-2  # it did clip


def test_optimizer_is_fused_on_cuda_and_foreach_elsewhere():
    model = _MetricModel()
    cpu = build_optimizer(model, 1e-3, 0.01, (0.9, 0.999), 1e-6, torch.device("cpu"))
    assert cpu.defaults["foreach"] and not cpu.defaults["fused"]
    cuda = build_optimizer(model, 1e-3, 0.01, (0.9, 0.999), 1e-6, torch.device("cuda"))  # built, never stepped
    assert cuda.defaults["fused"] and not cuda.defaults["foreach"]
    decay, no_decay = cuda.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    expected = {id(model.linear.bias), id(model.LayerNorm.weight), id(model.LayerNorm.bias)}
    assert {id(p) for p in no_decay["params"]} == expected


def test_autocast_choice_and_errors():
    assert isinstance(autocast_for(torch.device("cpu"), "auto")(), contextlib.nullcontext)
    with autocast_for(torch.device("cpu"), "bf16")():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert isinstance(autocast_for(torch.device("cuda"), "fp32")(), contextlib.nullcontext)
    with pytest.raises(ValueError, match="precision"):
        autocast_for(torch.device("cpu"), "fp8")
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainStep(_MetricModel(), torch.optim.SGD(_MetricModel().parameters(), lr=1.0), None, max_grad_norm=0)
    with pytest.raises(ValueError, match="micro_batches"):
        _metric_step()[1]([])


def test_to_device_moves_whatever_the_pipeline_yields():
    plan = electra_triton.ops.unpad_plan(torch.tensor([[1, 1, 0]]))
    moved = to_device({"input_ids": torch.ones(2, 3), "plan": plan, "max_seqlen": 3}, torch.device("cpu"))
    assert moved["max_seqlen"] == 3 and moved["plan"].indices.equal(plan.indices)


def _pretrainer(patched: bool) -> ElectraPretrainer:
    generator, discriminator = build_models(DISCRIMINATOR, GENERATOR, _Tokenizer())
    if patched:
        electra_triton.patch(generator)
        electra_triton.patch(discriminator)
    return ElectraPretrainer(generator, discriminator, [PAD, CLS, SEP, MASK], MASK, max_seq_len=16)


def _pretrain_step(model: ElectraPretrainer) -> TrainStep:
    optimizer = build_optimizer(model, 1e-3, 0.01, (0.9, 0.999), 1e-6, torch.device("cpu"), fused=True)
    return TrainStep(model, optimizer, build_scheduler(optimizer, 1, 10), max_grad_norm=1.0)


def test_step_runs_the_pretrainer_and_counts_its_metrics():
    model = _pretrainer(patched=False)
    step = _pretrain_step(model)
    ids, mask = _batch(B=2, L=16)
    step([{"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}])
    values = step.read_metrics()
    assert set(PRETRAIN_METRICS) <= values.keys()
    assert values["rtd_count"] == mask.sum().item() and values["loss"] > 0 and values["grad_norm"] > 0


def test_whole_patched_step_takes_no_host_sync():
    # The configuration meant to run sync-free: patched models, a padded batch with the unpad plan the loader builds
    # on the CPU (when the patched encoder takes one).
    model = _pretrainer(patched=True)
    step = _pretrain_step(model)
    ids, mask = _batch(B=2, L=16)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    assert accepts_unpad_plan(model.generator) and accepts_unpad_plan(model.discriminator)
    batch["unpad_plan"] = electra_triton.ops.unpad_plan(mask)
    step([batch])
    with OpTrace() as trace:
        step([batch])
    assert trace.host_syncs == 0, trace.sync_ops()


def test_pretrain_loop_reads_metrics_on_logging_steps_only(tmp_path, monkeypatch):
    from test_pretrain_data import micro_config

    from electra_triton.pretrain import train

    reads = []
    read_metrics = TrainStep.read_metrics

    def counting(self):
        values = read_metrics(self)
        reads.append(values["steps"])
        return values

    monkeypatch.setattr(TrainStep, "read_metrics", counting)
    assert train.run(micro_config(tmp_path, max_steps=5, log_every=2, save_every=10)) == 0
    assert reads == [2, 2, 1]  # steps 2 and 4, then the last: the window holds the steps since the previous read
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if json.loads(line)["split"] == "train"]
    assert [m["step"] for m in metrics] == [2, 4, 5] and all(m["grad_norm"] > 0 for m in metrics)
