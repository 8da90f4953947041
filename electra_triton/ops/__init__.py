"""Differentiable fused ops: argument checks, autograd (registered with torch.library), and PyTorch references."""

from ._dispatch import get_kernel_mode, set_kernel_mode
from .mlm_loss import mlm_loss, mlm_loss_reference
from .rtd_loss import rtd_loss, rtd_loss_reference

__all__ = ["get_kernel_mode", "mlm_loss", "mlm_loss_reference", "rtd_loss", "rtd_loss_reference", "set_kernel_mode"]
