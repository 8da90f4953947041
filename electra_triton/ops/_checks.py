"""Argument checks shared by the ops: each raises TypeError or ValueError naming the argument and what was expected."""

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value: object) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    return tensor


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def check_like(
    name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor, dtype: bool = True
) -> None:
    """Same device (and by default same dtype) as `reference`."""
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")
    if dtype and tensor.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {reference_name} has {reference.dtype}")


def check_norm_param(name: str, param: object, reference_name: str, reference: torch.Tensor, n_cols: int) -> None:
    """A LayerNorm weight or bias: (n_cols,), on `reference`'s device, in its dtype or float32 (16-bit activations
    with fp32 parameters, as under autocast)."""
    check_like(name, check_float(name, param), reference_name, reference, dtype=False)
    if param.dtype not in (reference.dtype, torch.float32):
        raise TypeError(f"{name} must have {reference_name}'s dtype ({reference.dtype}) or float32, got {param.dtype}")
    check_shape(name, param, (n_cols,))


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return float(eps)


def check_dropout_p(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_vocab_projection(
    hidden: object, weight: object, bias: object, labels: object, ignore_index: object, params_like_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The arguments of a vocabulary projection + cross-entropy (mlm_loss, generator_head): hidden (..., E) float,
    weight (V, E), bias (V,) or None, integer labels of hidden.shape[:-1], int ignore_index. With
    `params_like_hidden` weight and bias must also share hidden's dtype. Returns (hidden, labels)."""
    hidden = check_float("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., E)")
    check_like("weight", check_float("weight", weight), "hidden", hidden, dtype=params_like_hidden)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_like("bias", check_float("bias", bias), "hidden", hidden, dtype=params_like_hidden)
        check_shape("bias", bias, (weight.shape[0],))
    labels = check_tensor("labels", labels)
    check_shape("labels", labels, hidden.shape[:-1])
    check_like("labels", labels, "hidden", hidden, dtype=False)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return hidden, labels
