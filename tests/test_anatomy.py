"""The step anatomy (benchmarks/anatomy.py): FLOPs against the analytic count, bytes of a plain GEMM, the JSON
schema and its PROJECTED labels, the declared costs of the fused ops, the roofline, the tracing switch."""

import json
import pathlib
import sys

import pytest
import torch

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:  # benchmarks/ is not installed; it runs from the checkout
    sys.path.insert(0, str(REPOSITORY))

from benchmarks import anatomy, roofline  # noqa: E402
from electra_triton import op_costs  # noqa: E402
from electra_triton.ops import _dispatch  # noqa: E402
from electra_triton.tracing import OpRecord, OpTrace, TensorMeta  # noqa: E402

RUN_KEYS = {"backend", "projected_step_ms", "projected_step_ms_h200", "host_syncs", "device_ops", "flops",
            "model_flops", "bytes", "layers", "parts", "generator_head", "label"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("anatomy")
    assert anatomy.main(["--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--out", str(out)]) == 0
    return json.loads((out / "anatomy.json").read_text()), (out / "anatomy.md").read_text()


@pytest.mark.parametrize("backend", ["hf-sdpa", "electra-triton"])
def test_model_flops_match_the_analytic_count(written, backend):
    # Compared: matrix-multiply FLOPs of forward + backward by the model-FLOPs convention (backward = 2x forward, no
    # recomputation), summed over the traced step, against pretrain.model.flops_per_token x tokens at the model's
    # slot count. A full batch, so padded and unpadded attention do the same work.
    payload, _ = written
    run = next(run for run in payload["runs"] if run["backend"] == backend)
    assert run["flops"] > run["model_flops"]  # the attention backward recomputes QK^T
    assert run["model_flops"] == pytest.approx(run["analytic_model_flops"], rel=0.01)


def test_stock_attention_is_cudas_fused_kernel_and_dropout_is_fused():
    trace, model = anatomy.trace_step("small", 32, 2, "hf-sdpa")  # the tiny demo preset has no dropout
    assert model.discriminator.config.hidden_dropout_prob > 0
    counts = trace.counts()
    layers = model.generator.config.num_hidden_layers + model.discriminator.config.num_hidden_layers
    assert counts["electra_triton_anatomy::sdpa_forward"] == layers
    assert counts["electra_triton_anatomy::sdpa_backward"] == layers
    assert counts["aten::bmm"] == 0 and counts["aten::bernoulli_"] == 0 and counts["aten::native_dropout"] > 0
    assert counts["aten::_fused_adamw_"] == 2  # the CUDA optimizer: one fused update per parameter group
    assert any(r.backward and r.scope == ("discriminator.layer.1",) for r in trace.records)


def test_plain_gemm_bytes_are_inputs_plus_output():
    a, b = torch.randn(48, 32, dtype=torch.float16), torch.randn(32, 16, dtype=torch.float16)
    with OpTrace() as trace:
        out = a @ b
    (record,) = [r for r in trace.records if r.is_device_op]
    cost = op_costs.op_cost(record)
    assert cost.bytes == a.nbytes + b.nbytes + out.nbytes
    assert cost.flops == cost.model_flops == 2 * 48 * 32 * 16 and cost.kernels == 1


def test_elementwise_and_in_place_bytes():
    x = torch.randn(64, 8)
    with OpTrace() as trace:
        x.add_(1.0)  # reads and writes x
        x.zero_()  # writes x without reading it
    costs = [op_costs.op_cost(r) for r in trace.records if r.is_device_op]
    assert (costs[0].bytes_read, costs[0].bytes_written) == (x.nbytes, x.nbytes)
    assert (costs[1].bytes_read, costs[1].bytes_written) == (0, x.nbytes) and costs[0].flops == 0


def test_multi_tensor_launches_follow_atens_chunk_and_tensor_limits():
    chunk, blocks = 65536, 320
    assert op_costs.multi_tensor_launches([chunk * blocks], 1) == 1
    assert op_costs.multi_tensor_launches([chunk * blocks + 1], 1) == 2  # a 321st chunk
    assert op_costs.multi_tensor_launches([1] * 110, 1) == 1 and op_costs.multi_tensor_launches([1] * 111, 1) == 2
    assert op_costs.multi_tensor_launches([1] * 36, 4) == 1 and op_costs.multi_tensor_launches([1] * 37, 4) == 2
    assert op_costs.multi_tensor_launches([0, 0], 2) == 0


def test_foreach_copy_writes_its_destinations_without_reading_them():
    sources = [torch.randn(300, 4), torch.randn(7)]
    destinations = [torch.empty(300, 4, dtype=torch.float16), torch.empty(7, dtype=torch.float16)]
    with OpTrace() as trace:
        torch._foreach_copy_(destinations, sources)
    (record,) = [r for r in trace.records if r.is_device_op]
    cost = op_costs.op_cost(record)
    assert cost.bytes_read == sum(t.nbytes for t in sources)
    assert cost.bytes_written == sum(t.nbytes for t in destinations) and cost.kernels == 1


def _record(name: str, **arguments) -> OpRecord:
    return OpRecord(name, None, [], [], False, False, False, (), arguments)


def test_attention_costs_agree_across_layouts():
    batch, heads, seqlen, head_dim = 2, 4, 16, 32
    common = {"mask": None, "max_seqlen": seqlen, "scale": 0.1, "dropout_p": 0.0, "rng": None}
    def meta(*shape: int, values: tuple[int, ...] | None = None) -> TensorMeta:
        return TensorMeta(shape, torch.int32 if len(shape) == 1 else torch.bfloat16, "cpu", values)

    padded = op_costs.op_cost(_record("electra_triton::attention_forward", q=meta(batch, heads, seqlen, head_dim),
                                      cu_seqlens=None, **common))
    packed = op_costs.op_cost(_record("electra_triton::attention_qkvpacked_forward",
                                      qkv=meta(batch, seqlen, 3, heads, head_dim), cu_seqlens=None, **common))
    assert padded.flops == packed.flops == 4 * batch * heads * seqlen * seqlen * head_dim
    # Varlen: two sequences of 10 and 6 tokens attend within themselves; known boundaries count exactly.
    varlen = op_costs.op_cost(_record("electra_triton::attention_qkvpacked_backward", qkv=meta(16, 3, heads, head_dim),
                                      cu_seqlens=meta(3, values=(0, 10, 16)), **common))
    assert varlen.model_flops == 2 * 4 * heads * head_dim * (10 * 10 + 6 * 6) and varlen.flops > varlen.model_flops
    bound = op_costs.op_cost(_record("electra_triton::attention_forward", q=meta(16, heads, head_dim),
                                     cu_seqlens=meta(3), **common))
    assert bound.flops == 4 * heads * head_dim * 16 * seqlen  # boundaries unknown: every token sees max_seqlen keys


def test_generator_head_cost_one_gemm_in_budget_three_when_chunked():
    rows, vocab, width = 64, 1000, 32
    hidden, weight = TensorMeta((rows, width), torch.bfloat16, "cpu"), TensorMeta((vocab, width), torch.bfloat16, "cpu")
    args = {"hidden": hidden, "weight": weight, "bias": None, "labels": TensorMeta((rows,), torch.int64, "cpu"),
            "ignore_index": -100, "temperature": 1.0, "rng": None, "compute_grad": True}
    scalar, ids = TensorMeta((), torch.float32, "cpu"), TensorMeta((rows,), torch.int64, "cpu")
    empty = TensorMeta((0,), torch.bfloat16, "cpu")
    one_pass = _record("electra_triton::generator_head_forward", **args)
    one_pass.outputs = [scalar, scalar, ids, ids, TensorMeta((rows, vocab), torch.bfloat16, "cpu"), empty, empty, empty]
    chunked = _record("electra_triton::generator_head_forward", **args)
    chunked.outputs = [scalar, scalar, ids, ids, empty, hidden, TensorMeta((vocab, width), torch.float32, "cpu"), empty]
    single, folded = op_costs.op_cost(one_pass), op_costs.op_cost(chunked)
    assert single.flops == 2 * rows * vocab * width and folded.flops == 3 * single.flops
    logits = rows * vocab * 2
    assert single.bytes >= weight.nbytes + 3 * logits and not single.host_sync


def test_compiled_unpad_plan_op_is_a_declared_sync():
    mask = TensorMeta((4, 16), torch.int64, "cpu")
    record = _record("electra_triton::unpad_plan_of_mask", attention_mask=mask)
    record.outputs = [TensorMeta((50,), torch.int64, "cpu"), TensorMeta((5,), torch.int32, "cpu")]
    cost = op_costs.op_cost(record)
    assert cost.host_sync and cost.bytes == mask.nbytes + 50 * 8 + 5 * 4 and cost.flops == 0


def test_every_fused_op_declares_its_cost():
    fused = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("electra_triton::")]
    assert fused, "no electra_triton custom op registered"
    missing = [name for name in fused if name not in op_costs.DECLARED]
    assert not missing, f"declare the cost of {missing} in electra_triton/op_costs.py"


def test_json_schema_and_projected_labels(written):
    payload, markdown = written
    assert payload["label"] == "PROJECTED" and "PROJECTED" in payload["note"]
    assert [run["backend"] for run in payload["runs"]] == ["hf-sdpa", "electra-triton"]
    assert payload["efficiency"] == roofline.EFFICIENCY.as_dict()
    for run in payload["runs"]:
        assert run.keys() >= RUN_KEYS and run["label"] == "PROJECTED"
        assert run["projected_step_ms"] > 0 and run["device_ops"] > 0 and run["bytes"] > 0
        assert run["host_syncs"] == len(run["sync_ops"])
        assert set(run["layers"]) == {"generator", "discriminator"} and run["layers"]["generator"]["count"] == 2
        assert run["generator_head"]["part"] == anatomy.GENERATOR_HEAD
        assert sum(part["projected_ms"] for part in run["parts"]) == pytest.approx(run["projected_step_ms"])
        assert run["uncosted_ops"] == []
        assert len(run["ops"]) >= run["device_ops"] and sum(op["host_sync"] for op in run["ops"]) == run["host_syncs"]
        assert sum(op["projected_us"] for op in run["ops"]) / 1e3 == pytest.approx(run["projected_step_ms"])
        assert sum(op["bytes_read"] + op["bytes_written"] for op in run["ops"]) == pytest.approx(run["bytes"])
    assert payload["runs"][0]["step_vs_hf_sdpa"] == 1.0
    assert markdown.startswith("# Step anatomy") and "**PROJECTED**" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| backend"))
    assert all("PROJECTED" in column for column in header.split("|") if " ms" in column)


def test_padding_shows_in_the_trace():
    full, _ = anatomy.trace_step("tiny", 32, 2, "hf-sdpa", fill=1.0)
    padded, _ = anatomy.trace_step("tiny", 32, 2, "hf-sdpa", fill=0.5)
    # A padded batch makes transformers build and pass an attention mask: the fused attention reads it.
    mask_bytes = lambda trace: sum(r.arguments["mask"].nbytes for r in trace.records  # noqa: E731
                                   if r.name == "electra_triton_anatomy::sdpa_forward" and r.arguments["mask"])
    assert mask_bytes(full) == 0 < mask_bytes(padded)
    with pytest.raises(ValueError, match="fill"):
        anatomy.anatomy_batch(100, 2, 32, fill=0.0)


def test_roofline_takes_the_slower_of_compute_and_memory():
    h100, eff = roofline.H100, roofline.EFFICIENCY
    memory_bound = op_costs.OpCost(bytes_read=3.35e9, kernels=1)
    assert roofline.op_time_us(memory_bound, h100) == pytest.approx(1e3 / eff.memory + eff.kernel_us)  # 1 ms of bytes
    compute_bound = op_costs.OpCost(flops=989e12, model_flops=989e12, bytes_read=1.0, kernels=1,
                                    matmul_dtype="bfloat16")
    assert roofline.op_time_us(compute_bound, h100) == pytest.approx(1e6 / eff.matmul + eff.kernel_us)
    synced = op_costs.OpCost(host_sync=True)
    assert roofline.op_time_us(synced, h100) == eff.host_sync_us
    assert roofline.op_time_us(memory_bound, roofline.H200) < roofline.op_time_us(memory_bound, h100)


def test_kernel_path_switch_is_scoped():
    meta = torch.device("meta")
    assert not _dispatch.use_kernel("gelu_linear", meta)
    with _dispatch.kernel_path_for_tracing():
        assert _dispatch.use_kernel("gelu_linear", meta)
        _dispatch.set_kernel_mode("reference")
        try:
            assert not _dispatch.use_kernel("gelu_linear", meta)  # an explicit reference mode still wins
        finally:
            _dispatch.set_kernel_mode("auto")
    assert not _dispatch.use_kernel("gelu_linear", meta)


def test_run_rejects_unknown_names():
    with pytest.raises(ValueError, match="preset"):
        anatomy.run("huge", 32, 2)
    with pytest.raises(ValueError, match="backend"):
        anatomy.trace_step("tiny", 32, 2, "hf-eager")
