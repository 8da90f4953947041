"""DESIGN.md's accuracy rule for low precision, as FlashAttention's tests apply it.

Against a float64 reference, our error may be at most `factor` times the error of the plain PyTorch implementation run
in the same dtype, plus a small absolute slack. In fp32, our result matches the reference to ~1e-5 relative.
"""

import torch

ABSOLUTE_SLACK = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item()


def assert_accurate(
    name: str, ours: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, factor: float = 2.0,
    rtol_fp32: float = 1e-5,
) -> None:
    """ours: the kernel's result; plain: PyTorch's in the same dtype; exact: the float64 reference."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: not finite"
    error = max_error(ours, exact)
    scale = exact.abs().max().item()
    if ours.dtype == torch.float32:
        bound = rtol_fp32 * max(scale, 1.0)
        assert error <= bound, f"{name}: fp32 error {error:.3g} > {bound:.3g} (scale {scale:.3g})"
        return
    plain_error = max_error(plain, exact)
    bound = factor * plain_error + ABSOLUTE_SLACK[ours.dtype] * max(scale, 1.0)
    assert error <= bound, f"{name}: error {error:.3g} > {factor} x PyTorch's {plain_error:.3g} + slack ({ours.dtype})"
