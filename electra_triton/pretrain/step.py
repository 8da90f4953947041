"""One optimizer step of `electra-triton pretrain`, shared with `benchmarks/pretrain.py` and `benchmarks/anatomy.py`.

A step is: for each micro-batch, move it to the device, forward under autocast, backward of loss / grad_accum (DDP and
FSDP synchronise gradients on the last micro-batch only); then clip the gradient norm (inside the fused AdamW kernel
when there is one), take the AdamW step, advance the LR schedule and clear the gradients. Metrics (loss sums,
accuracy counts, the gradient norm) are added into one device tensor: nothing in a step waits for the device.
`read_metrics()` is the one host synchronisation, taken on logging steps only.

The step passes each batch through to the model as keyword arguments, whatever the data pipeline put in it (padded
batches today; packed rows, position ids or an `ops.UnpadPlan` tomorrow): any value with a `.to(device,
non_blocking=...)` method travels to the device, anything else is passed as is.
"""

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .model import linear_schedule, parameter_groups

# What ElectraPretrainer.forward returns besides the loss it backpropagates, summed over a logging window.
PRETRAIN_METRICS = ("loss", "mlm_loss", "rtd_loss", "mlm_correct", "mlm_count", "rtd_correct", "rtd_count")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    device: torch.device, fused: bool | None = None) -> torch.optim.AdamW:
    """ELECTRA's AdamW (no decay on biases and LayerNorm): fused on CUDA (one kernel for all parameters, no host
    sync), the foreach implementation elsewhere. `fused` overrides the choice (the step anatomy traces the CUDA
    optimizer on CPU)."""
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused,
                             foreach=None if fused else True)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then linear decay to 0 (ELECTRA's schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup_steps, max_steps))


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The forward's autocast context (a fresh one per call): bf16 on CUDA for "auto" and "bf16", bf16 on CPU for
    "bf16" only, none for "fp32"."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch on `device`: tensors and anything else with `.to(device, non_blocking=...)`, copied asynchronously."""
    return {key: value.to(device, non_blocking=True) if hasattr(value, "to") else value
            for key, value in batch.items()}


class TrainStep:
    """`step(micro_batches)` runs one optimizer step; see the module docstring.

    model: what the forward calls (the pre-trainer, or its DDP / FSDP / torch.compile wrapper); it returns a mapping
    with "loss" and the `metric_keys`. parameters: the ones to clip (default: model's). metric_keys: outputs summed
    into the metrics window.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, max_grad_norm: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 parameters: Iterable[torch.Tensor] | None = None, metric_keys: Sequence[str] = PRETRAIN_METRICS):
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast
        self.parameters = [p for p in (model.parameters() if parameters is None else parameters) if p.requires_grad]
        self.metric_keys = tuple(metric_keys)
        self.device = self.parameters[0].device
        # Window layout: the metric sums, then micro-steps, optimizer steps and the sum of gradient norms.
        self.window = torch.zeros(len(self.metric_keys) + 3, device=self.device, dtype=torch.float64)
        self._one = torch.ones((), device=self.device, dtype=torch.float64)  # made once: counts steps on the device

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient all-reduce on the last micro-batch only (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def __call__(self, micro_batches: Sequence[Mapping[str, Any]]) -> None:
        if not micro_batches:
            raise ValueError("micro_batches must hold at least one batch")
        count = len(micro_batches)
        for index, batch in enumerate(micro_batches):
            with self._sync_context(index == count - 1):
                with self.autocast():
                    out = self.model(**to_device(batch, self.device))
                (out["loss"] / count).backward()
            sums = [out[key].detach().to(torch.float64) for key in self.metric_keys]
            self.window.narrow(0, 0, len(sums) + 1).add_(torch.stack([*sums, self._one]))
        norm = self._clip()
        self.window.narrow(0, len(self.metric_keys) + 1, 2).add_(torch.stack([self._one, norm.detach().double()]))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _folds_clipping_into_the_optimizer(self) -> bool:
        """Whether the optimizer step can clip: fused Adam/AdamW divides every gradient by `optimizer.grad_scale`
        (GradScaler's hook) inside its one kernel, so clipping costs no pass over the gradients of its own. Not for
        DTensor gradients (FSDP2), whose shards the scale tensor would have to match."""
        return (isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW)
                and bool(self.optimizer.defaults.get("fused"))
                and not any(hasattr(p.grad, "full_tensor") for p in self.parameters if p.grad is not None))

    def _clip(self) -> torch.Tensor:
        """Clip the gradient norm to max_grad_norm (torch's clip_grad_norm_ rule: scale by min(1, max_norm / (norm +
        1e-6))) and return the norm. It stays a tensor: no .item(). foreach: what CUDA picks anyway (a few
        multi-tensor kernels, not two per parameter), on every device."""
        if not self._folds_clipping_into_the_optimizer():
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm, foreach=True)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # The fused step divides by this and writes the clipped gradients back, as clip_grad_norm_ leaves them.
        self.optimizer.grad_scale = ((norm + 1e-6) / self.max_grad_norm).clamp(min=1.0).to(torch.float32)
        return norm

    def read_metrics(self) -> dict[str, float]:
        """The window's sums (all-reduced over ranks) as floats, then an empty window: the one host synchronisation.

        Keys: the metric keys, "micro_steps", "steps" and "grad_norm" (mean over the window's optimizer steps).
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.window)
            world = dist.get_world_size()
        else:
            world = 1
        values = self.window.tolist()
        self.window.zero_()
        n = len(self.metric_keys)
        result = dict(zip(self.metric_keys, values[:n], strict=True))
        # Every rank adds the same step count and the same (global) norm: undo the all-reduce's sum for those.
        steps = values[n + 1] / world
        result.update(micro_steps=values[n], steps=steps, grad_norm=values[n + 2] / world / max(steps, 1))
        return result
