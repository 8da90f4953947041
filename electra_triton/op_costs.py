"""What each op of a traced step costs on a GPU: FLOPs, bytes read and written, kernel launches, host syncs.

The step anatomy (benchmarks/anatomy.py) prices every record of an `electra_triton.tracing.OpTrace` with `op_cost`.
ATen ops are priced from their shapes and dtypes by a few rules (below). Fused custom ops launch kernels the trace
cannot see into, so each declares its cost here, in `DECLARED`, keyed by op name: whoever adds or changes a fused op
updates its entry (tests/test_anatomy.py fails for an `electra_triton::` op without one).

FLOPs are matrix-multiply FLOPs (2 per multiply-add), the work tensor cores do; elementwise arithmetic is not counted
(those ops are priced by their bytes). `flops` is what the kernels execute (a flash-attention backward recomputes
QK^T); `model_flops` follows the model-FLOPs convention of `pretrain.model.flops_per_token` (backward = 2x forward,
no recomputation), the number MFU is quoted against.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .tracing import OpRecord, TensorMeta


@dataclasses.dataclass(frozen=True)
class OpCost:
    flops: float = 0.0  # matrix-multiply FLOPs executed
    model_flops: float = 0.0  # the same by the model-FLOPs convention (no recomputation)
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    kernels: int = 0  # kernel launches
    host_sync: bool = False  # the host waits for the device (seen by the trace, or declared inside a fused op)
    attention: bool = False  # a fused attention kernel (its own efficiency in the roofline)
    matmul_dtype: str | None = None  # dtype of the tensor-core work, for its peak

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written


def _numel(meta: TensorMeta | None) -> int:
    return math.prod(meta.shape) if meta is not None else 0


def _nbytes(value: Any) -> int:
    if isinstance(value, TensorMeta):
        return value.nbytes
    if isinstance(value, list):
        return sum(_nbytes(item) for item in value)
    return 0


def _dtype_name(meta: TensorMeta) -> str:
    return str(meta.dtype).removeprefix("torch.")


def _io(record: OpRecord, skip_reads: tuple[str, ...] = ()) -> tuple[float, float]:
    """Bytes read (every tensor argument but `skip_reads`) and written (outputs, and inputs written in place that
    the op does not return)."""
    read = sum(_nbytes(value) for name, value in record.arguments.items() if name not in skip_reads)
    written = sum(meta.nbytes for meta in record.outputs) + sum(meta.nbytes for meta in record.written)
    return read, written


# ---------------------------------------------------------------------------------------------------- ATen rules

_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                "aten::new_empty_strided", "aten::empty_permuted"}
# Ops that overwrite `self` without reading it.
_OVERWRITES = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_", "aten::bernoulli_",
               "aten::random_", "aten::exponential_", "aten::_foreach_copy_"}
# Gathers read only what they gather: the output's worth of their source.
_GATHERS = {"aten::embedding": "weight", "aten::index_select": "self", "aten::gather": "self", "aten::index": "self"}


def _matmul_cost(record: OpRecord) -> OpCost:
    operands = {"aten::mm": ("self", "mat2"), "aten::bmm": ("self", "mat2"), "aten::addmm": ("mat1", "mat2"),
                "aten::baddbmm": ("batch1", "batch2")}[record.name]
    a, b = (record.arguments[name] for name in operands)
    *batch, m, k = a.shape
    n = b.shape[-1]
    flops = 2.0 * math.prod(batch) * m * n * k
    read, written = _io(record)
    return OpCost(flops, flops, read, written, 1, matmul_dtype=_dtype_name(a))


# ATen's multi-tensor kernels (foreach ops, fused optimizers) take chunks of 65,536 elements, at most 320 chunks and
# a depth-dependent number of tensors per launch (MultiTensorApply.cuh), depth = tensor lists the kernel walks.
_MULTI_TENSOR_CHUNK, _MULTI_TENSOR_BLOCKS, _MULTI_TENSOR_MAX_TENSORS = 65536, 320, (110, 64, 48, 36, 30)


def multi_tensor_launches(numels: list[int], depth: int) -> int:
    """Kernel launches of one multi-tensor apply over tensors of these sizes, walking `depth` lists at once."""
    max_tensors = _MULTI_TENSOR_MAX_TENSORS[min(depth, 5) - 1]
    launches = tensors = blocks = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = math.ceil(numel / _MULTI_TENSOR_CHUNK)
        while chunks:
            taken = min(chunks, _MULTI_TENSOR_BLOCKS - blocks)
            blocks += taken
            chunks -= taken
            if blocks == _MULTI_TENSOR_BLOCKS or (not chunks and tensors == max_tensors):
                launches += 1
                tensors, blocks = (1 if chunks else 0), 0
    return launches + (1 if blocks else 0)


def _tensor_lists(record: OpRecord) -> list[list[TensorMeta]]:
    return [value for value in record.arguments.values()
            if isinstance(value, list) and value and all(isinstance(item, TensorMeta) for item in value)]


def _foreach_cost(record: OpRecord) -> OpCost:
    # An out-of-place foreach op also walks its output list; _foreach_norm reduces into a scratch buffer instead and
    # finishes with one more kernel.
    lists = _tensor_lists(record)
    numels = [_numel(meta) for meta in lists[0]] if lists else []
    norm = record.name == "aten::_foreach_norm"
    depth = len(lists) + (1 if not record.name.endswith("_") and not norm else 0)
    read, written = _io(record, skip_reads=("self",) if record.name in _OVERWRITES else ())
    return OpCost(bytes_read=read, bytes_written=written,
                  kernels=max(1, multi_tensor_launches(numels, depth)) + (1 if norm else 0))


def _fused_adam_cost(record: OpRecord) -> OpCost:
    # Reads parameters, gradients and both moments; writes parameters and moments, and with a grad_scale (the
    # pre-training step's clipping) the divided gradients too.
    params, grads = record.arguments["self"], record.arguments["grads"]
    moments = _nbytes(record.arguments["exp_avgs"]) + _nbytes(record.arguments["exp_avg_sqs"])
    launches = multi_tensor_launches([_numel(meta) for meta in params], 4)
    scaled = _nbytes(grads) if record.arguments.get("grad_scale") is not None else 0
    return OpCost(bytes_read=_nbytes(params) + _nbytes(grads) + moments,
                  bytes_written=_nbytes(params) + moments + scaled, kernels=max(1, launches))


# ------------------------------------------------------------------------------------- declared: electra_triton ops


def _attention_flops(args: dict[str, Any]) -> float:
    """QK^T and PV: 4 * heads * head_dim per (query, key) pair of a sequence. q is (B, H, L, D) or varlen (T, H, D);
    a packed qkv is (B, L, 3, H, D) or varlen (T, 3, H, D)."""
    cu_seqlens, max_seqlen = args["cu_seqlens"], args["max_seqlen"]
    if "qkv" in args:
        *leading, _, heads, head_dim = args["qkv"].shape
    else:
        *leading, heads, head_dim = args["q"].shape if cu_seqlens is not None else (
            args["q"].shape[0], args["q"].shape[2], args["q"].shape[1], args["q"].shape[3])
    if cu_seqlens is None:
        batch, seqlen = leading
        pairs = batch * seqlen * seqlen
    elif cu_seqlens.values is not None:  # the boundaries are host data in a fake trace: exact
        pairs = sum((end - start) ** 2 for start, end in zip(cu_seqlens.values, cu_seqlens.values[1:], strict=False))
    else:  # an upper bound: every token attends to max_seqlen keys
        pairs = leading[0] * max_seqlen
    return 4.0 * heads * head_dim * pairs


def _attention_dtype(args: dict[str, Any]) -> str:
    return _dtype_name(args["qkv"] if "qkv" in args else args["q"])


def _attention_forward(record: OpRecord) -> OpCost:
    flops = _attention_flops(record.arguments)
    read, written = _io(record)
    return OpCost(flops, flops, read, written, 1, attention=True, matmul_dtype=_attention_dtype(record.arguments))


def _attention_backward(record: OpRecord) -> OpCost:
    # Three kernels (delta preprocess, dK/dV, dQ); dK/dV and dQ each recompute P: 7 matmuls against the forward's 2.
    forward = _attention_flops(record.arguments)
    read, written = _io(record)
    return OpCost(3.5 * forward, 2.0 * forward, read, written, 3, attention=True,
                  matmul_dtype=_attention_dtype(record.arguments))


def _gelu_linear_forward(record: OpRecord) -> OpCost:
    x, weight = record.arguments["x"], record.arguments["weight"]
    flops = 2.0 * x.shape[0] * weight.shape[0] * weight.shape[1]
    read, written = _io(record)
    return OpCost(flops, flops, read, written, 1, matmul_dtype=_dtype_name(x))


def _gelu_linear_backward(record: OpRecord) -> OpCost:
    args = record.arguments
    x, weight = args["x"], args["weight"]
    gemms = int(args["needs_dx"]) + int(args["needs_dw"])
    flops = 2.0 * gemms * x.shape[0] * weight.shape[0] * weight.shape[1]
    read, written = _io(record)
    return OpCost(flops, flops, read, written, max(gemms, 1), matmul_dtype=_dtype_name(x))


def _row_kernels(kernels: int) -> Callable[[OpRecord], OpCost]:
    """A memory-bound fused op: reads its inputs, writes its outputs, in `kernels` launches."""

    def cost(record: OpRecord) -> OpCost:
        read, written = _io(record)
        return OpCost(bytes_read=read, bytes_written=written, kernels=kernels)

    return cost


def _mlm_loss_forward(record: OpRecord) -> OpCost:
    # Today's kernel (kernels/mlm_loss.py): gathers the active rows (nonzero: a host sync), then per chunk of rows
    # three GEMMs over the whole (V, E) weight, the logits chunk written and read back, and an fp32 read-modify-write
    # of the weight gradient. Every slot is taken as active (an upper bound; a full batch is close to it).
    args = record.arguments
    hidden, weight = args["hidden"], args["weight"]
    rows, (vocab, width) = hidden.shape[0], weight.shape
    gemms = 3 if args["compute_grad"] else 1
    flops = 2.0 * gemms * rows * vocab * width
    chunk = max(64, 2 ** math.ceil(math.log2(max(1, math.ceil(rows / math.ceil(vocab / width))))))
    chunks = math.ceil(rows / chunk)
    element = weight.nbytes // max(1, _numel(weight))
    logits = rows * vocab * element
    read = chunks * gemms * weight.nbytes + 2 * hidden.nbytes + logits
    written = logits + hidden.nbytes
    if args["compute_grad"]:
        read += chunks * vocab * width * 4
        written += chunks * vocab * width * 4
    return OpCost(flops, flops, read, written, chunks * (gemms + 1) + 2, host_sync=True,
                  matmul_dtype=_dtype_name(hidden))


def _generator_head_forward(record: OpRecord) -> OpCost:
    # The fused generator head (ops.generator_head): one logits GEMM, then one pass per row reading the logits and
    # writing the loss, sample, argmax and, in place, the logits' gradient, which the backward's two GEMMs (traced as
    # aten::mm) read. Past its memory budget it chunks the rows and folds each chunk's two gradient GEMMs into the
    # forward, with an fp32 read-modify-write of the weight gradient per chunk.
    args = record.arguments
    hidden, weight = args["hidden"], args["weight"]
    rows, (vocab, width) = hidden.shape[0], weight.shape
    element = hidden.nbytes // max(1, _numel(hidden))
    logits = rows * vocab * element
    outputs_written = sum(meta.nbytes for meta in record.outputs)
    in_place = len(record.outputs) > 4 and _numel(record.outputs[4]) > 0  # dlogits returned: one chunk
    if in_place or not args["compute_grad"]:
        flops = 2.0 * rows * vocab * width
        read = hidden.nbytes + weight.nbytes + _nbytes(args["labels"]) + logits  # the row pass reads the logits
        written = logits + outputs_written  # the GEMM writes the logits; the pass overwrites them with dlogits
        return OpCost(flops, flops, read, written, 4, matmul_dtype=_dtype_name(hidden))
    chunks = max(1, math.ceil(logits / 2**30))  # the kernel's budget: a chunk's logits stay within 1 GiB
    flops = 6.0 * rows * vocab * width
    read = chunks * 2 * weight.nbytes + 2 * hidden.nbytes + 2 * logits + chunks * vocab * width * 4
    written = 2 * logits + chunks * vocab * width * 4 + outputs_written
    return OpCost(flops, flops, read, written, chunks * 4 + 2, matmul_dtype=_dtype_name(hidden))


def _rtd_loss_forward(record: OpRecord) -> OpCost:
    hidden = record.arguments["hidden"]
    flops = 2.0 * _numel(hidden)  # the (H -> 1) projection of every token
    read, written = _io(record)
    return OpCost(flops, flops, read, written, 1)


def _rtd_loss_backward(record: OpRecord) -> OpCost:
    hidden = record.arguments["hidden"]
    flops = 4.0 * _numel(hidden)  # d_hidden and d_weight
    read, written = _io(record)
    return OpCost(flops, flops, read, written, 2)


# kernels/_launch.py's persistent grid on an H100 (4 programs per SM, 132 SMs): the backward's column partials.
_H100_PROGRAMS = 4 * 132


def _embedding_gathers(args: dict[str, Any]) -> int:
    """Bytes of table rows a pass over the embeddings reads: a word row per token from DRAM; the position and
    token-type tables (1.5 MB and 6 KB for ELECTRA-base) stay in L2, so each of their rows is read once at most."""
    tokens = _numel(args["input_ids"])
    word, position, token_type = args["word"], args["position"], args["token_type"]
    row = word.nbytes // max(1, word.shape[0])
    return row * (tokens + min(tokens, position.shape[0]) + min(tokens, token_type.shape[0]))


def _small_inputs(args: dict[str, Any], names: tuple[str, ...]) -> int:
    return sum(_nbytes(args[name]) for name in names)


def _embeddings_forward(record: OpRecord) -> OpCost:
    # One kernel: the gathers, LayerNorm and dropout per row; writes the output, fp32 mean and rstd (and the mask).
    args = record.arguments
    read = _embedding_gathers(args) + _small_inputs(
        args, ("input_ids", "position_ids", "token_type_ids", "weight", "bias", "rng"))
    return OpCost(bytes_read=read, bytes_written=sum(meta.nbytes for meta in record.outputs), kernels=1)


def _embeddings_backward(record: OpRecord) -> OpCost:
    # Zero fills of the word and position tables' fp32 gradients and of the column partials, the row kernel (reads
    # the output gradient, recomputes the sum from the gathers, scatter-adds each row's gradient into the word table
    # (a read-modify-write of the row: the table outgrows L2) and the L2-resident position table, writes partials),
    # the partials' reduction; casts when the tables are 16-bit.
    args = record.arguments
    word, position, token_type = args["word"], args["position"], args["token_type"]
    width, tokens = word.shape[1], _numel(args["input_ids"])
    fp32_tables = 4 * width * (word.shape[0] + position.shape[0])
    partials = 4 * width * (2 + token_type.shape[0]) * _H100_PROGRAMS
    scatter = 4 * width * (tokens + min(tokens, position.shape[0]))
    read = (_embedding_gathers(args) + scatter + partials
            + _small_inputs(args, ("grad_y", "input_ids", "position_ids", "token_type_ids", "weight", "mean", "rstd")))
    written = fp32_tables + scatter + 2 * partials + record.outputs[2].nbytes
    if _dtype_name(word) == "float32":
        return OpCost(bytes_read=read, bytes_written=written, kernels=5)
    return OpCost(bytes_read=read + fp32_tables, bytes_written=written + word.nbytes + position.nbytes, kernels=7)


def _unpad_plan_of_mask(record: OpRecord) -> OpCost:
    # ops.unpad_plan as one op for compiled code (integration12): nonzero of the mask (a host sync), row sums, cumsum.
    read, written = _io(record)
    return OpCost(bytes_read=read, bytes_written=written, kernels=3, host_sync=True)


DECLARED: dict[str, Callable[[OpRecord], OpCost]] = {
    "electra_triton::attention_forward": _attention_forward,
    "electra_triton::attention_backward": _attention_backward,
    "electra_triton::attention_qkvpacked_forward": _attention_forward,
    "electra_triton::attention_qkvpacked_backward": _attention_backward,
    "electra_triton::gelu_linear_forward": _gelu_linear_forward,
    "electra_triton::gelu_linear_backward": _gelu_linear_backward,
    "electra_triton::dropout_add_layer_norm_forward": _row_kernels(1),
    "electra_triton::dropout_add_layer_norm_backward": _row_kernels(2),  # rows, then the dW/dB column sums
    "electra_triton::embeddings_layer_norm_forward": _embeddings_forward,
    "electra_triton::embeddings_layer_norm_backward": _embeddings_backward,
    "electra_triton::mlm_loss_forward": _mlm_loss_forward,
    "electra_triton::generator_head_forward": _generator_head_forward,
    "electra_triton::unpad_plan_of_mask": _unpad_plan_of_mask,
    "electra_triton::rtd_loss_forward": _rtd_loss_forward,
    "electra_triton::rtd_loss_backward": _rtd_loss_backward,
    "aten::_fused_adamw_": _fused_adam_cost,
    "aten::_fused_adam_": _fused_adam_cost,
}


def declare(name: str, cost: Callable[[OpRecord], OpCost]) -> None:
    """Declare the cost of an op defined outside this package (the anatomy's model of a GPU library kernel)."""
    DECLARED[name] = cost


def op_cost(record: OpRecord) -> OpCost:
    """The GPU cost of one traced op."""
    sync = record.host_sync
    if not record.is_device_op:
        return OpCost(host_sync=sync)
    name = record.name
    if name in DECLARED:
        cost = DECLARED[name](record)
        return dataclasses.replace(cost, host_sync=cost.host_sync or sync)
    if name in _MATMULS:
        return dataclasses.replace(_matmul_cost(record), host_sync=sync)
    if name in _ALLOCATIONS:
        return OpCost(host_sync=sync)
    if name.startswith("aten::_foreach_"):
        return dataclasses.replace(_foreach_cost(record), host_sync=sync)
    if name in _GATHERS and record.outputs:
        source = _GATHERS[name]
        read, written = _io(record, skip_reads=(source,))
        return OpCost(bytes_read=read + record.outputs[0].nbytes, bytes_written=written, kernels=1, host_sync=sync)
    read, written = _io(record, skip_reads=("self",) if name in _OVERWRITES else ())
    return OpCost(bytes_read=read, bytes_written=written, kernels=1, host_sync=sync)
