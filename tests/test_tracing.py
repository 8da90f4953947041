"""electra_triton.tracing: the op / host-sync counter that structural tests and the step anatomy build on."""

import torch

from electra_triton import ops
from electra_triton.tracing import OpTrace, host_side


def test_counts_device_ops_not_views():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8)
    with OpTrace() as trace:
        y = (x @ w).view(2, 16).t()
        y.sum().backward()
    counts = trace.counts()
    assert counts["aten::mm"] == 2  # forward, and dX in the backward
    assert "aten::view" not in counts and "aten::t" not in counts
    assert trace.device_ops == sum(counts.values())
    assert any(r.name == "aten::view" and not r.is_device_op for r in trace.records)
    assert trace.host_syncs == 0


def test_counts_host_syncs():
    x = torch.tensor([0.0, 1.0, 2.0])
    with OpTrace() as trace:
        x.sum().item()
        x.nonzero()
        bool(x.any())
        x[x > 0]
    assert trace.host_syncs >= 4, trace.sync_ops()
    assert "aten::_local_scalar_dense" in trace.sync_ops() and "aten::nonzero" in trace.sync_ops()


def test_host_side_work_is_neither_op_nor_sync():
    with OpTrace() as trace:
        with host_side():
            seed = torch.randint(0, 100, (2,))
        seed.tolist()
    assert trace.device_ops == 0 and trace.host_syncs == 0


def test_fused_op_is_one_record_and_its_rng_draw_is_host_side():
    x, residual = torch.randn(6, 32), torch.randn(6, 32)
    weight, bias = torch.ones(32), torch.zeros(32)
    with OpTrace() as trace:
        ops.dropout_add_layer_norm(x, residual, weight, bias, 1e-12, 0.1)
    counts = trace.counts()
    assert counts["electra_triton::dropout_add_layer_norm_forward"] == 1
    assert trace.host_syncs == 0
    assert "aten::randint" not in counts


def test_scopes_tag_records():
    trace = OpTrace()
    with trace:
        with trace.scope("layer0"):
            torch.ones(3) + 1
        torch.ones(3) * 2
    scoped = [r.name for r in trace.records if r.scope == ("layer0",)]
    assert "aten::add" in scoped and all(r.scope == () for r in trace.records if r.name == "aten::mul")


def test_backward_ops_carry_their_forward_scope():
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    trace = OpTrace()
    with trace, trace.module_scopes({"first": first, "second": second}):
        second(first(x)).sum().backward()
    backward = [r for r in trace.records if r.backward and r.name == "aten::mm"]
    assert {r.scope for r in backward} == {("first",), ("second",)}  # dW of each, dX of the second
    assert all(not r.backward for r in trace.records if r.name == "aten::addmm")
    assert any(r.name == "aten::addmm" and r.scope == ("first",) for r in trace.records)


def test_fake_run_keeps_host_data_real():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        weight = torch.randn(16, 4, requires_grad=True)  # fake: no memory, no values
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # real host data
    with OpTrace(fake) as trace:
        rows = weight[: mask.numel()].view(2, 4, 4)
        picked = rows[mask.bool()]  # the output's shape depends on the real mask: 5 rows
        everything = bool(mask.all())  # a sync on real data gives the real answer
        lengths = mask.sum(1)  # computed from host data alone: stays real
        picked.sum().backward()
    assert isinstance(picked, FakeTensor) and picked.shape == (5, 4)
    assert everything is False and not isinstance(lengths, FakeTensor) and lengths.tolist() == [3, 2]
    assert {"aten::_local_scalar_dense", "aten::index"} <= set(trace.sync_ops())
    assert any(r.estimated for r in trace.records if r.name == "aten::index")  # fake values stood in by zeros
    summed = next(r for r in trace.records if r.name == "aten::sum" and r.arguments.get("dim") == [1])
    assert summed.outputs[0].values == (3, 2)  # small host-side integer results are recorded with their values


def test_integer_indexing_is_no_sync_but_a_boolean_mask_is():
    x, index = torch.randn(6, 3), torch.tensor([0, 2, 2])
    with OpTrace() as trace:
        x[index]
        x[index] = 1.0
    assert trace.host_syncs == 0, trace.sync_ops()
    with OpTrace() as trace:
        x[x[:, 0] > 0]
    assert trace.sync_ops() == ["aten::index"]


def test_blocking_copies_from_the_gpu_are_syncs():
    from electra_triton.tracing import TensorMeta, _blocking_copy_to_host

    gpu, cpu = TensorMeta((4,), torch.float32, "cuda"), TensorMeta((4,), torch.float32, "cpu")
    assert _blocking_copy_to_host("aten::_to_copy", {"self": gpu, "non_blocking": False}, [cpu])
    assert _blocking_copy_to_host("aten::copy_", {"self": cpu, "src": gpu, "non_blocking": False}, [cpu])
    assert not _blocking_copy_to_host("aten::_to_copy", {"self": gpu, "non_blocking": True}, [cpu])  # pinned, async
    assert not _blocking_copy_to_host("aten::_to_copy", {"self": cpu, "non_blocking": False}, [gpu])  # host to GPU
    assert not _blocking_copy_to_host("aten::_to_copy", {"self": cpu}, [cpu])
    with OpTrace() as trace:
        torch.ones(3).to(torch.float64).tolist()  # on the CPU: no device to wait for
    assert trace.host_syncs == 0
