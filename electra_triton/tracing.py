"""What a step would execute on a GPU, counted on any device: every aten / custom op, host synchronisations among them.

    with OpTrace() as trace:
        loss = model(**batch).loss
        loss.backward()
    trace.device_ops, trace.host_syncs, trace.counts().most_common(10)

A `TorchDispatchMode` sees each op once, below autograd (so the backward is included) and above the kernels (a
`torch.library` custom op such as `electra_triton::attention_forward` is one record, whatever it launches inside).
Views and metadata queries are recorded but not counted as device ops: they launch nothing.

A host synchronisation is an op whose result the host must wait for: a data-dependent scalar (`.item()`, `bool(t)`,
`torch.equal`) or a data-dependent output shape (`nonzero`, boolean-mask indexing), on a tensor that would live on
the GPU. Work that stays on the host on a GPU run too (the fused ops draw their RNG seed into a small CPU tensor) is
declared with `host_side()`: its ops are neither device ops nor syncs, and reading the tensors it made is no sync.
"""

import contextlib
import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Launch nothing on a GPU: metadata reads and aliasing.
_METADATA_OPS = {
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type", "aten::size",
    "aten::stride", "aten::dim", "aten::numel", "aten::is_contiguous", "aten::_nested_tensor_size",
    "aten::record_stream", "prim::device", "prim::layout",
}
_SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal",
             "aten::allclose", "aten::masked_select", "aten::unique", "aten::_unique2", "aten::repeat_interleave"}

_HOST_ATTRIBUTE = "_electra_triton_host"
_host = threading.local()


@contextlib.contextmanager
def host_side() -> Iterator[None]:
    """Ops run inside stay on the host on a GPU run too: not device ops, and the tensors they make are host data."""
    _host.depth = getattr(_host, "depth", 0) + 1
    try:
        yield
    finally:
        _host.depth -= 1


def _is_host(tensor: torch.Tensor) -> bool:
    return getattr(tensor, _HOST_ATTRIBUTE, False)


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= int(size)
        return numel * (torch.finfo(self.dtype).bits if self.dtype.is_floating_point else
                        torch.iinfo(self.dtype).bits if self.dtype != torch.bool else 8) // 8


@dataclasses.dataclass
class OpRecord:
    name: str  # "aten::mm", "electra_triton::attention_forward"
    overload: Any  # the OpOverload, for callers that need its schema
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    is_view: bool
    on_host: bool  # made inside host_side()
    host_sync: bool
    scope: tuple[str, ...]  # the OpTrace.scope(...) names open when it ran

    @property
    def is_device_op(self) -> bool:
        return not self.is_view and not self.on_host and self.name not in _METADATA_OPS


def _metas(tree: Any) -> tuple[list[TensorMeta], list[torch.Tensor]]:
    leaves, _ = tree_flatten(tree)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return [TensorMeta(tuple(t.shape), t.dtype, t.device.type) for t in tensors], tensors


class OpTrace(TorchDispatchMode):
    """Records every op dispatched while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self._scope: list[str] = []

    def scope(self, name: str) -> "_Scope":
        """Context manager: records made inside carry `name` in their `scope`."""
        return _Scope(self, name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        inputs, in_tensors = _metas((args, kwargs))
        outputs, out_tensors = _metas(out)
        on_host = getattr(_host, "depth", 0) > 0
        if on_host:
            for tensor in out_tensors:
                setattr(tensor, _HOST_ATTRIBUTE, True)
        device_inputs = [t for t in in_tensors if not _is_host(t)]
        sync = not on_host and bool(device_inputs) and (
            name in _SYNC_OPS or any(tag in func.tags for tag in _SYNC_TAGS))
        is_view = bool(getattr(func, "is_view", False))
        self.records.append(OpRecord(name, func, inputs, outputs, is_view, on_host, sync, tuple(self._scope)))
        return out

    @property
    def device_ops(self) -> int:
        return sum(record.is_device_op for record in self.records)

    @property
    def host_syncs(self) -> int:
        return sum(record.host_sync for record in self.records)

    def counts(self, device_ops_only: bool = True) -> Counter:
        """Counter of op names (device ops only by default)."""
        return Counter(r.name for r in self.records if r.is_device_op or not device_ops_only)

    def sync_ops(self) -> list[str]:
        return [record.name for record in self.records if record.host_sync]


class _Scope:
    def __init__(self, trace: OpTrace, name: str) -> None:
        self.trace, self.name = trace, name

    def __enter__(self) -> "_Scope":
        self.trace._scope.append(self.name)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.trace._scope.pop()
