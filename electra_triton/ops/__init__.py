"""Differentiable fused ops: argument checks, autograd (registered with torch.library), and PyTorch references."""

from ._dispatch import get_kernel_mode, set_kernel_mode
from .rtd_loss import rtd_loss, rtd_loss_reference

__all__ = ["get_kernel_mode", "rtd_loss", "rtd_loss_reference", "set_kernel_mode"]
