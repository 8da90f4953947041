"""Launch helpers shared by the kernel modules."""

import functools

import torch


@functools.cache
def programs_per_device(device: torch.device) -> int:
    """How many programs a persistent-style grid aims for: 4 per SM on a GPU, a few under the interpreter (each
    program then covers many rows, so interpreter tests still exercise the loops)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
