"""Where an op runs: the Triton kernel (compiled on CUDA, interpreted on CPU) or the PyTorch reference.

- CUDA tensors: always the kernel. Never a silent fallback.
- CPU tensors with TRITON_INTERPRET=1 set before import: the kernel, in Triton's interpreter (triton reads the
  variable when a kernel is decorated, so it must be set before electra_triton is imported).
- CPU tensors otherwise: the PyTorch reference, announced once per op through `logging`.

`set_kernel_mode("reference")` forces the references everywhere (the pre-training command's `--kernels reference`);
`"triton"` refuses to fall back on CPU. `kernel_path_for_tracing()` sends every device to the kernel path, for tracing
under FakeTensorMode only (the step anatomy): there the custom ops' fake implementations run, never a kernel.
"""

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from ..tracing import host_side

logger = logging.getLogger("electra_triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_MODES = ("auto", "triton", "reference")

_kernel_mode = "auto"
_tracing_kernels = False
_announced: set[tuple[str, str]] = set()


@contextlib.contextmanager
def kernel_path_for_tracing() -> Iterator[None]:
    """Inside, `use_kernel` is True on every device: the fused ops take the path a GPU run takes. Use it only with
    fake tensors (torch._subclasses.FakeTensorMode), whose custom-op fake implementations stand in for the kernels."""
    global _tracing_kernels
    previous, _tracing_kernels = _tracing_kernels, True
    try:
        yield
    finally:
        _tracing_kernels = previous


def set_kernel_mode(mode: str) -> None:
    """Choose between the Triton kernels and the PyTorch references: "auto", "triton" or "reference"."""
    global _kernel_mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    _kernel_mode = mode


def get_kernel_mode() -> str:
    return _kernel_mode


def _announce(op: str, where: str) -> None:
    # torch.compile cannot trace logging calls (a graph break); the eager run before it has announced already.
    if (op, where) not in _announced and not torch.compiler.is_compiling():
        _announced.add((op, where))
        logger.info("electra_triton.ops.%s runs %s", op, where)


def use_kernel(op: str, device: torch.device) -> bool:
    """True to launch the Triton kernel for `op` on `device`, False to run its PyTorch reference."""
    if _kernel_mode == "reference":
        _announce(op, "the PyTorch reference (kernel mode 'reference')")
        return False
    if device.type == "cuda" or _tracing_kernels:
        return True
    if device.type == "cpu" and INTERPRET:
        _announce(op, "in the Triton interpreter on CPU")
        return True
    if _kernel_mode == "triton":
        raise RuntimeError(
            f"electra_triton.ops.{op}: kernel mode 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"import for CPU tensors; got a tensor on {device}"
        )
    _announce(op, f"the PyTorch reference on {device.type} (no GPU; set TRITON_INTERPRET=1 to run the kernel)")
    return False


def philox_rng_state(dropout_p: float) -> torch.Tensor:
    """(seed, offset) for a kernel's counter-based RNG: an int64 CPU tensor of 2, drawn from torch's generator (zeros,
    drawing nothing, when dropout_p is 0).

    Drawing on the host costs no device synchronisation, `torch.manual_seed` reproduces the sequence, and two calls
    in a row differ. It stays a tensor up to the custom op, which reads the two ints inside its (opaque)
    implementation: reading them in traced code would break a torch.compile(fullgraph=True) graph.
    """
    if torch.compiler.is_compiling():  # a graph holds no host bookkeeping
        return _draw_rng_state(dropout_p)
    with host_side():  # host data on a GPU run too: electra_triton.tracing counts neither op nor sync for it
        return _draw_rng_state(dropout_p)


def _draw_rng_state(dropout_p: float) -> torch.Tensor:
    if dropout_p == 0.0:
        return torch.zeros(2, dtype=torch.int64)
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
