"""generator_head: ELECTRA's generator LM head fused (kernels/mlm_loss.py): loss, Gumbel-max sample and argmax from one
logits GEMM and one pass per row; the backward is two GEMMs. Reference and checks here too.

Bad labels without a host synchronisation: a label neither in [0, V) nor ignore_index makes the kernel set a flag in
device memory and gives that row a NaN loss. On CUDA the flag is copied to pinned host memory asynchronously behind
a CUDA event, and every later generator_head call raises ValueError for each earlier call whose event has completed
with the flag set (the first call after the bad one's kernel finished, typically the next step). On CPU (the
interpreter) the kernel has finished by then, so the call itself raises. Checking eagerly on CUDA would cost a host
sync per step, which the training loop must not have (see electra_triton.tracing).
"""

import math

import torch
import torch.nn.functional as F

from ..kernels import mlm_loss as kernel
from ..tracing import host_side
from ._checks import check_vocab_projection
from ._dispatch import philox_rng_state, use_kernel


def generator_head_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    temperature: float = 1.0, ignore_index: int = -100, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch generator_head in fp32 (the CPU fallback, and what the kernel is tested against).

    The samples come from torch's generator through `Tensor.exponential_` (Gumbel = -log of an Exp(1) draw): the same
    distribution as the kernel's Philox noise, not the same draws.
    """
    _check_labels_now(labels, weight.shape[0], ignore_index)
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    flat_labels = labels.reshape(-1).long()
    per_row = F.cross_entropy(logits.reshape(-1, weight.shape[0]), flat_labels, ignore_index=ignore_index,
                              reduction="none")
    loss = per_row.sum() / (flat_labels != ignore_index).sum().clamp_min(1)
    with torch.no_grad():
        gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
        sampled = (logits / temperature + gumbel).argmax(-1)
    return loss, sampled, logits.detach().argmax(-1)


def _check_labels_now(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """The eager check (a host sync on CUDA): for the reference and for callers that synchronise anyway."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(_bad_labels_message(vocab_size, ignore_index))


def _bad_labels_message(vocab_size: int, ignore_index: int) -> str:
    return f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}"


# (host copy of a kernel's invalid-label flag, CUDA event after the copy or None on CPU, V, ignore_index)
_pending_label_flags: list[tuple[torch.Tensor, torch.cuda.Event | None, int, int]] = []


def _watch_label_flag(flag: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    if flag.device.type == "cuda":
        host_flag = torch.empty(1, dtype=flag.dtype, pin_memory=True)
        host_flag.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        _pending_label_flags.append((host_flag, event, vocab_size, ignore_index))
    else:
        _pending_label_flags.append((flag, None, vocab_size, ignore_index))


def _raise_for_flagged_labels() -> None:
    """Raise ValueError if a finished generator_head call saw bad labels; never waits for the device."""
    finished, still_running = [], []
    for entry in _pending_label_flags:
        (finished if entry[1] is None or entry[1].query() else still_running).append(entry)
    _pending_label_flags[:] = still_running
    for host_flag, event, vocab_size, ignore_index in finished:
        if int(host_flag[0]):
            where = "" if event is None else " (found after the call's kernel finished; that call's loss was NaN)"
            raise ValueError(_bad_labels_message(vocab_size, ignore_index) + where)


@torch.library.custom_op("electra_triton::generator_head_forward", mutates_args=())
def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    temperature: float, rng: torch.Tensor, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """hidden (R, E), labels (R,) contiguous -> (loss, count, sampled, argmax, dlogits, grad_hidden, grad_weight,
    grad_bias): the gradient outputs are empty unless they apply (see kernels/mlm_loss.generator_head_forward)."""
    seed, offset = rng.tolist()
    flag = torch.zeros(1, device=hidden.device, dtype=torch.int32)
    out = kernel.generator_head_forward(
        hidden, weight, bias, labels, ignore_index, temperature, seed, offset, True, compute_grad, flag)
    _watch_label_flag(flag, weight.shape[0], ignore_index)
    _raise_for_flagged_labels()
    count = (labels != ignore_index).sum(dtype=torch.float32)
    loss = out["losses"].sum() / count.clamp_min(1.0)
    empty = [hidden.new_empty(0) for _ in range(4)]  # distinct tensors: custom op outputs may not alias
    grads = [out[key] if out[key] is not None else placeholder
             for key, placeholder in zip(("dlogits", "grad_hidden", "grad_weight", "grad_bias"), empty)]
    return loss, count, out["samples"], out["argmax"], *grads


@_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, rng, compute_grad):
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    scalar = hidden.new_empty((), dtype=torch.float32)
    ids = [labels.new_empty(n_rows, dtype=torch.int64) for _ in range(2)]
    grads = [hidden.new_empty(0) for _ in range(4)]
    if compute_grad and kernel.rows_per_chunk(n_rows, vocab_size, hidden.element_size()) >= n_rows:
        grads[0] = hidden.new_empty(n_rows, vocab_size)
    elif compute_grad:
        grads[1:3] = [torch.empty_like(hidden), hidden.new_empty(weight.shape, dtype=torch.float32)]
        if bias is not None:
            grads[3] = hidden.new_empty(vocab_size, dtype=torch.float32)
    return scalar, scalar.clone(), *ids, *grads


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, count, _, _, dlogits, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(hidden, weight, count, dlogits, grad_hidden, grad_weight, grad_bias)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # only the loss carries a gradient: no (R, V) zeros for the other outputs


def _scaled(tensor: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (tensor.float() * scale).to(dtype)


def _autograd_backward(ctx, grad_loss, *_):
    hidden, weight, count, dlogits, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    if grad_loss is None:  # a backward through the other outputs only: they are constants
        return None, None, None, None, None, None, None, None
    scale = grad_loss.float() / count.clamp_min(1.0)  # the mean over rows and the upstream gradient, on the device
    wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
    wants_bias = wants_bias and ctx.has_bias
    if grad_hidden.numel() or grad_weight.numel():  # chunked: the forward folded each chunk's gradient in already
        d_hidden = _scaled(grad_hidden, scale, hidden.dtype) if wants_hidden else None
        d_weight = _scaled(grad_weight, scale, weight.dtype) if wants_weight else None
        d_bias = _scaled(grad_bias, scale, weight.dtype) if wants_bias else None
    else:  # the two GEMMs over the logits' gradient left in place by the kernel; the scale goes on the small sides
        d_hidden = _scaled(dlogits @ weight, scale, hidden.dtype) if wants_hidden else None
        d_weight = dlogits.T @ _scaled(hidden, scale, hidden.dtype) if wants_weight else None
        d_bias = _scaled(dlogits.sum(dim=0, dtype=torch.float32), scale, weight.dtype) if wants_bias else None
    return d_hidden, d_weight, d_bias, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _rng_state(generator: torch.Generator | None) -> torch.Tensor:
    """(seed, offset) for the kernel's Philox noise, an int64 CPU tensor, from `generator` or torch's default one."""
    if generator is None:
        return philox_rng_state(1.0)  # any nonzero rate draws
    with host_side():  # a CPU generator draws on the host; a CUDA one costs a sync (an evaluation-time option)
        draw = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, generator=generator, device=generator.device)
        return draw.cpu()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def generator_head(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    temperature: float = 1.0, ignore_index: int = -100, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ELECTRA's generator head on the masked rows: (mean cross-entropy, Gumbel-max sample, argmax), fused.

    With logits = hidden @ weight.T + bias (as `generator_lm_head` computes them), returns
    - loss: `F.cross_entropy(logits, labels, ignore_index=ignore_index)` as an fp32 scalar (0, with zero gradients,
      when no label differs from `ignore_index`);
    - sampled_ids: argmax(logits / temperature + Gumbel noise), a sample from softmax(logits / temperature), for every
      row (ignored rows too), without gradient. The noise is Philox seeded from `generator` (default: torch's
      default generator, so `torch.manual_seed` reproduces it); consecutive calls differ;
    - argmax_ids: logits.argmax(-1) (MLM accuracy).
    Logits are computed once (one GEMM; in the autocast dtype under autocast, as F.linear would) and held only while
    they fit the memory budget of kernels/mlm_loss.py (else in chunks). Backward: two GEMMs, nothing recomputed.

    hidden (..., E) float; weight (V, E), bias (V,) or None, of hidden's dtype outside autocast; labels of shape
    hidden.shape[:-1], integer, each in [0, V) or equal to `ignore_index` (else ValueError: at once on CPU, at a
    later call on CUDA, see the module docstring); temperature > 0. sampled_ids and argmax_ids: int64 of labels' shape.
    """
    autocast_dtype = _autocast_dtype(hidden.device) if isinstance(hidden, torch.Tensor) else None
    hidden, labels = check_vocab_projection(hidden, weight, bias, labels, ignore_index, autocast_dtype is None)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite float, got {temperature}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    if autocast_dtype is not None:
        hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
        bias = None if bias is None else bias.to(autocast_dtype)
    # The op's own matmuls run in the dtype just chosen: an enclosing autocast must not cast them again.
    with torch.autocast(hidden.device.type, enabled=False):
        if not use_kernel("generator_head", hidden.device):
            return generator_head_reference(hidden, weight, bias, labels, float(temperature), ignore_index, generator)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        loss, _, sampled, argmax = _forward(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).contiguous(), ignore_index,
            float(temperature), _rng_state(generator), needs_grad,
        )[:4]
    return loss, sampled.view(labels.shape), argmax.view(labels.shape)
