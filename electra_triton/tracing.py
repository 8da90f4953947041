"""What a step would execute on a GPU, counted on any device: every aten / custom op, host synchronisations among them.

    with OpTrace() as trace:
        loss = model(**batch).loss
        loss.backward()
    trace.device_ops, trace.host_syncs, trace.counts().most_common(10)

A `TorchDispatchMode` sees each op once, below autograd (so the backward is included) and above the kernels (a
`torch.library` custom op such as `electra_triton::attention_forward` is one record, whatever it launches inside).
Views and metadata queries are recorded but not counted as device ops: they launch nothing.

A host synchronisation is an op whose result the host must wait for: a data-dependent scalar (`.item()`, `bool(t)`,
`torch.equal`), a data-dependent output shape (`nonzero`, boolean-mask indexing), on a tensor that would live on
the GPU, or a blocking copy from the GPU into host memory (`.cpu()`, `.tolist()`; seen only on a GPU run). Work that
stays on the host on a GPU run too (the fused ops draw their RNG seed into a small CPU tensor) is declared with
`host_side()`: its ops are neither device ops nor syncs, and reading the tensors it made is no sync.

Scopes name where an op ran: `trace.scope(name)` or `trace.module_scopes({name: module})` (forward hooks). An op of
the backward pass gets the scope its forward op had: the autograd node that runs it carries the sequence number
assigned in the forward, and the trace remembers which scope was open at each sequence number.

With `fake=FakeTensorMode(...)` the trace runs a step on fake tensors (shapes and dtypes only, no memory, no compute),
for sizes this machine cannot run (the step anatomy). Host data stays real: an op whose tensor inputs are all real
(the batch's ids and masks, what is computed from them alone) runs for real, so data-dependent shapes and the host
syncs taken on the batch come out as they would on a GPU. An op that needs the values of a fake tensor (a sync on
computed data) is answered with zeros in place of those values and marked `estimated`.
"""

import bisect
import contextlib
import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

# Launch nothing on a GPU: metadata reads and aliasing.
_METADATA_OPS = {
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type", "aten::size",
    "aten::stride", "aten::dim", "aten::numel", "aten::is_contiguous", "aten::_nested_tensor_size",
    "aten::record_stream", "aten::promote_types", "aten::result_type", "prim::device", "prim::layout",
    "profiler::_record_function_enter_new", "profiler::_record_function_exit",  # host-side profiler marks
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
    values: tuple[int, ...] | None = None  # a small integer tensor's contents when known without a sync (host data)

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
    scope: tuple[str, ...]  # the scope names open when it ran (for a backward op: when its forward op ran)
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)  # schema name -> TensorMeta(s) or value
    written: list[TensorMeta] = dataclasses.field(default_factory=list)  # inputs written in place, not returned
    backward: bool = False  # run by the autograd engine
    estimated: bool = False  # a fake run answered it with zeros for unknown values (see the module docstring)

    @property
    def is_device_op(self) -> bool:
        return not self.is_view and not self.on_host and self.name not in _METADATA_OPS


_VALUES_LIMIT = 4096  # elements: cu_seqlens-sized, not token-sized


def _meta(tensor: torch.Tensor) -> TensorMeta:
    known = (tensor.device.type == "cpu" and not isinstance(tensor, FakeTensor) and tensor.numel() <= _VALUES_LIMIT
             and not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool)
    values = None
    if known:
        with _disable_current_modes():  # a real tensor: read it as is, not through a fake mode below
            values = tuple(tensor.reshape(-1).tolist())
    return TensorMeta(tuple(int(size) for size in tensor.shape), tensor.dtype, tensor.device.type, values)


def _metas(tree: Any) -> tuple[list[TensorMeta], list[torch.Tensor]]:
    leaves, _ = tree_flatten(tree)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return [_meta(t) for t in tensors], tensors


def _described(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _meta(value)
    if isinstance(value, (list, tuple)):
        return [_described(item) for item in value]
    return value


def _arguments(func, args: tuple, kwargs: dict) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Schema argument name -> described value; and the tensors the op writes in place."""
    named, written = {}, []
    for index, argument in enumerate(func._schema.arguments):
        if index < len(args):
            value = args[index]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        else:
            continue
        named[argument.name] = _described(value)
        if argument.alias_info is not None and argument.alias_info.is_write:
            leaves, _ = tree_flatten(value)
            written += [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    return named, written


def _indexing_syncs(name: str, arguments: dict[str, Any]) -> bool:
    """Indexing (`x[i]`, `x[i] = y`) waits for the device only with a boolean mask (its nonzero sets the shape);
    integer index tensors do not. Other ops: True."""
    indices = arguments.get("indices")
    if not name.startswith("aten::index") or not isinstance(indices, list):
        return True
    return any(isinstance(index, TensorMeta) and index.dtype in (torch.bool, torch.uint8) for index in indices)


def _blocking_copy_to_host(name: str, arguments: dict[str, Any], outputs: list[TensorMeta]) -> bool:
    """A copy from a GPU tensor into host memory that is not non_blocking (`.cpu()`, `.tolist()`, `.numpy()`): the
    host waits for it."""
    if name not in ("aten::_to_copy", "aten::copy_") or arguments.get("non_blocking"):
        return False
    source = arguments.get("self" if name == "aten::_to_copy" else "src")
    return isinstance(source, TensorMeta) and source.device not in ("cpu", "meta") and any(
        out.device == "cpu" for out in outputs)


class OpTrace(TorchDispatchMode):
    """Records every op dispatched while active (see the module docstring)."""

    def __init__(self, fake: FakeTensorMode | None = None) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.fake = fake
        self._scope: list[str] = []
        # (first autograd sequence number, scope open from then on): how backward ops find their forward's scope.
        self._scope_by_sequence: list[tuple[int, tuple[str, ...]]] = [(0, ())]

    def scope(self, name: str) -> "_Scope":
        """Context manager: records made inside carry `name` in their `scope`."""
        return _Scope(self, name)

    def enter_scope(self, name: str) -> None:
        self._scope.append(name)
        self._scope_by_sequence.append((torch._C._autograd._get_sequence_nr(), tuple(self._scope)))

    def exit_scope(self) -> None:
        self._scope.pop()
        self._scope_by_sequence.append((torch._C._autograd._get_sequence_nr(), tuple(self._scope)))

    @contextlib.contextmanager
    def module_scopes(self, modules: Mapping[str, torch.nn.Module]) -> Iterator[None]:
        """Inside, each module's forward runs in the scope of its name (nested modules give nested scopes)."""
        handles = []
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda *_, name=name: self.enter_scope(name)))
            handles.append(module.register_forward_hook(lambda *_: self.exit_scope()))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _current_scope(self) -> tuple[tuple[str, ...], bool]:
        node = torch._C._current_autograd_node()
        if node is None:
            return tuple(self._scope), False
        starts = [start for start, _ in self._scope_by_sequence]
        index = bisect.bisect_right(starts, node._sequence_nr()) - 1
        return self._scope_by_sequence[index][1], True

    def _run(self, func, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """func's result, and whether a fake run had to estimate it."""
        if self.fake is None:
            return func(*args, **kwargs), False
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with _disable_current_modes():  # host data: computed for real
                return func(*args, **kwargs), False
        try:
            return func(*args, **kwargs), False
        except (DataDependentOutputException, DynamicOutputShapeException):
            pass
        # Needs values nobody computed: zeros stand in for the fake tensors' values.
        stand_in = lambda t: torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, FakeTensor) else t  # noqa: E731
        with _disable_current_modes():
            out = func(*tree_map(stand_in, args), **tree_map(stand_in, kwargs))
        with self.fake:
            out = tree_map(lambda t: self.fake.from_tensor(t) if isinstance(t, torch.Tensor) else t, out)
        return out, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out, estimated = self._run(func, args, kwargs)
        name = func._schema.name
        inputs, in_tensors = _metas((args, kwargs))
        outputs, out_tensors = _metas(out)
        on_host = getattr(_host, "depth", 0) > 0
        if on_host:
            for tensor in out_tensors:
                setattr(tensor, _HOST_ATTRIBUTE, True)
        device_inputs = [t for t in in_tensors if not _is_host(t)]
        arguments, written = _arguments(func, args, kwargs)
        sync = not on_host and bool(device_inputs) and ((
            name in _SYNC_OPS or any(tag in func.tags for tag in _SYNC_TAGS)) and _indexing_syncs(name, arguments)
            or _blocking_copy_to_host(name, arguments, outputs))
        is_view = bool(getattr(func, "is_view", False))
        returned = {id(t) for t in out_tensors}
        scope, backward = self._current_scope()
        self.records.append(OpRecord(name, func, inputs, outputs, is_view, on_host, sync, scope, arguments,
                                     [_meta(t) for t in written if id(t) not in returned], backward, estimated))
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
        self.trace.enter_scope(self.name)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.trace.exit_scope()
