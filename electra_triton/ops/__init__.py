"""Differentiable fused ops: argument checks, autograd (registered with torch.library), and PyTorch references."""

from ._dispatch import get_kernel_mode, set_kernel_mode
from .attention import (
    attention,
    attention_qkvpacked,
    attention_qkvpacked_with_dropout_mask,
    attention_reference,
    attention_varlen,
    attention_varlen_qkvpacked,
    attention_varlen_qkvpacked_with_dropout_mask,
    attention_varlen_reference,
    attention_with_dropout_mask,
    pad_input,
    quantized_attention_dropout_p,
    unpad_input,
)
from .embeddings import embeddings_layer_norm, embeddings_layer_norm_reference, embeddings_layer_norm_with_mask
from .gelu_linear import gelu_linear, gelu_linear_reference
from .generator_head import generator_head, generator_head_reference
from .layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference, dropout_add_layer_norm_with_mask
from .linear import linear, pack_parameters
from .mlm_loss import mlm_loss, mlm_loss_reference
from .rtd_loss import rtd_loss, rtd_loss_reference
from .unpad import UnpadPlan, unpad_plan

__all__ = [
    "attention", "attention_qkvpacked", "attention_qkvpacked_with_dropout_mask", "attention_reference",
    "attention_varlen", "attention_varlen_qkvpacked", "attention_varlen_qkvpacked_with_dropout_mask",
    "attention_varlen_reference",
    "attention_with_dropout_mask", "pad_input", "quantized_attention_dropout_p", "unpad_input",
    "dropout_add_layer_norm", "dropout_add_layer_norm_reference", "dropout_add_layer_norm_with_mask",
    "embeddings_layer_norm", "embeddings_layer_norm_reference", "embeddings_layer_norm_with_mask",
    "gelu_linear", "gelu_linear_reference", "generator_head", "generator_head_reference",
    "get_kernel_mode", "linear", "mlm_loss", "mlm_loss_reference", "pack_parameters", "rtd_loss", "rtd_loss_reference",
    "set_kernel_mode",
    "UnpadPlan", "unpad_plan"]
