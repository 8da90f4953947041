"""Triton kernels, one file per op: @triton.jit kernels, launch configs, launchers. Imported as electra_triton.kernels.

Nothing here knows torch.nn or transformers; electra_triton.ops wraps these launchers as differentiable ops.
Every module lists the configurations it may launch in `compile_targets(models)`, read by the compile check.
"""
