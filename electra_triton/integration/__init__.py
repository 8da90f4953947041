"""Hugging Face transformers integration: `patch` / `unpatch` (fused forwards bound to module instances), the
class-level `apply_to_transformers`, and `attn_implementation="electra_triton"` (registered on import).

    plan.py               which module kinds get which fused forward (the declared table), and what is skipped
    forwards.py           the fused forwards, by module kind
    patch.py              patch / unpatch / apply_to_transformers
    attention_backend.py  the attention function and mask function registered with transformers

Data flows one way: this package calls `electra_triton.ops` only, never the kernels.
"""

from . import attention_backend  # noqa: F401  (registers attn_implementation="electra_triton")
from .patch import (
    FLAGS,
    SUPPORTED_MODELS,
    apply_to_transformers,
    fused_modules,
    patch,
    revert_transformers,
    unpatch,
)

__all__ = ["FLAGS", "SUPPORTED_MODELS", "apply_to_transformers", "fused_modules", "patch", "revert_transformers",
           "unpatch"]
