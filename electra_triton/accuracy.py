"""DESIGN.md's accuracy rule for low precision, as FlashAttention's tests apply it; shared by the tests and the GPU
evidence command (benchmarks/gpu).

Against a float64 reference, our error may be at most `factor` times the error of the plain PyTorch implementation run
in the same dtype, plus a small absolute slack. In fp32, our result matches the reference to ~1e-5 relative.
"""

from typing import Any

import torch

ABSOLUTE_SLACK = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item()


def accuracy(ours: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, factor: float = 2.0,
             rtol_fp32: float = 1e-5, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The rule's verdict as data: `ok`, our `error`, the `bound` it must stay under, and `plain_error` (PyTorch's
    error in the same dtype; None in fp32, where the bound is relative to the reference's scale instead).

    ours: the kernel's result; plain: PyTorch's in the same dtype; exact: the float64 reference. `dtype`: the
    precision the inputs had, when it differs from the result's (an fp32 loss from bf16 logits); default ours.dtype.
    """
    dtype = dtype or ours.dtype
    if ours.shape != exact.shape:
        raise ValueError(f"ours has shape {tuple(ours.shape)}, the reference {tuple(exact.shape)}")
    scale = exact.abs().max().item() if exact.numel() else 0.0
    finite = bool(torch.isfinite(ours).all())
    error = max_error(ours, exact) if ours.numel() else 0.0
    if dtype == torch.float32:
        plain_error, bound = None, rtol_fp32 * max(scale, 1.0)
    else:
        plain_error = max_error(plain, exact) if plain.numel() else 0.0
        bound = factor * plain_error + ABSOLUTE_SLACK[dtype] * max(scale, 1.0)
    return {"ok": finite and error <= bound, "finite": finite, "error": error, "plain_error": plain_error,
            "bound": bound, "scale": scale, "dtype": str(dtype).removeprefix("torch.")}


def assert_accurate(
    name: str, ours: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, factor: float = 2.0,
    rtol_fp32: float = 1e-5,
) -> None:
    """Raise AssertionError, naming `name`, when `ours` breaks the rule (see `accuracy`)."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    verdict = accuracy(ours, plain, exact, factor, rtol_fp32)
    assert verdict["finite"], f"{name}: not finite"
    if ours.dtype == torch.float32:
        assert verdict["ok"], (f"{name}: fp32 error {verdict['error']:.3g} > {verdict['bound']:.3g} "
                               f"(scale {verdict['scale']:.3g})")
    else:
        assert verdict["ok"], (f"{name}: error {verdict['error']:.3g} > {factor} x PyTorch's "
                               f"{verdict['plain_error']:.3g} + slack ({ours.dtype})")
