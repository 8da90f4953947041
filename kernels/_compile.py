"""What a kernel module declares to the ahead-of-time compile check (electra_triton.compile_check)."""

from dataclasses import dataclass, field
from typing import Any

import torch

TRITON_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@dataclass(frozen=True)
class CompileTarget:
    """One (kernel, signature, constexprs, launch options) the package may launch."""

    kernel: Any  # the @triton.jit function
    signature: dict[str, str]  # every argument in order: "*bf16", "i32", "fp32", or "constexpr"
    constexprs: dict[str, Any]
    aligned: tuple[str, ...]  # arguments Triton's launcher would mark divisible by 16
    num_warps: int
    num_stages: int
    multiplies_matrices: bool  # if True, the compile check demands HGMMA on sm_90a
    label: str  # the configuration in words, e.g. "H=768 bf16 mask=True"
    options: dict[str, Any] = field(default_factory=dict)  # further compiler options (e.g. maxnreg)


def specialized_target(
    kernel: Any, *, pointers: dict[str, str], ints: dict[str, int], constexprs: dict[str, Any], num_warps: int,
    num_stages: int, multiplies_matrices: bool, label: str, scalars: dict[str, str] | None = None,
) -> CompileTarget:
    """A CompileTarget that compiles what the launcher would, given example values of the integer arguments.

    Mirrors Triton's launch-time specialisation: an integer equal to 1 becomes a constant, one divisible by 16 and
    every pointer (torch allocations are 16-byte aligned) get the divisibility hint, which is what lets the compiler
    vectorise loads. `pointers` maps names to "*bf16"-style types, `scalars` float arguments to "fp32".
    """
    scalars = scalars or {}
    signature, constants, aligned = {}, dict(constexprs), []
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            aligned.append(name)
        elif name in scalars:
            signature[name] = scalars[name]
        elif name in ints:
            if ints[name] == 1:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i64" if abs(ints[name]) >= 2**31 else "i32"
                if ints[name] % 16 == 0:
                    aligned.append(name)
        else:
            raise ValueError(f"{kernel.__name__}: no type or value given for argument {name!r}")
    return CompileTarget(kernel, signature, constants, tuple(aligned), num_warps, num_stages, multiplies_matrices,
                         label)


def row_pass_targets(
    forward: Any, backward: Any, *, pointers: dict[str, str], ints: dict[str, int], scalars: dict[str, str],
    constexprs: dict[str, Any], store_masks: tuple[bool, ...], label: str, forward_launch: dict[str, Any],
    backward_launch: dict[str, Any],
) -> list[CompileTarget]:
    """The targets of a row-wise forward/backward kernel pair for one set of flags: the forward once per STORE_MASK
    value (the debug entry point stores the dropout mask), then the backward."""
    common = {"pointers": pointers, "ints": ints, "scalars": scalars}
    targets = [specialized_target(forward, constexprs={**constexprs, "STORE_MASK": store_mask},
                                  label=label + (" mask" if store_mask else ""), **common, **forward_launch)
               for store_mask in store_masks]
    targets.append(specialized_target(backward, constexprs=constexprs, label=label, **common, **backward_launch))
    return targets
