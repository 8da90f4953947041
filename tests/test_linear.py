"""ops.pack_parameters and ops.linear: values and gradients against plain PyTorch, the residual gradient folded into
the dX GEMM, one multi-tensor launch per direction, and argument checks."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from electra_triton import ops
from electra_triton.tracing import OpTrace


def _close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def _params(*shapes, dtype=torch.float32):
    return [torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True) for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pack_parameters_concatenates_casts_and_routes_gradients_back(dtype):
    wq, wk, wv, bq, bk, bv, w_out = _params((5, 7), (5, 7), (3, 7), (5,), (5,), (3,), (4, 13))
    weights = [wq, wk, wv]
    packed_w, packed_b, out_w = ops.pack_parameters([weights, [bq, bk, bv], [w_out]], dtype)
    assert packed_w.dtype == packed_b.dtype == out_w.dtype == dtype
    assert torch.equal(packed_w, torch.cat(weights).to(dtype))
    assert torch.equal(packed_b, torch.cat([bq, bk, bv]).to(dtype))
    assert torch.equal(out_w, w_out.to(dtype))
    grads = [torch.randn_like(t) for t in (packed_w, packed_b, out_w)]
    torch.autograd.backward([packed_w, packed_b, out_w], grads)
    expected = [*grads[0].float().split([5, 5, 3]), *grads[1].float().split([5, 5, 3]), grads[2].float()]
    for param, grad in zip([wq, wk, wv, bq, bk, bv, w_out], expected, strict=True):
        assert param.grad.dtype == torch.float32 and param.grad.shape == param.shape
        assert torch.equal(param.grad, grad)


def test_pack_parameters_returns_a_lone_tensor_of_the_dtype_as_is():
    weight, bias = _params((4, 3), (4,))
    packed_weight, packed_bias = ops.pack_parameters([[weight], [bias]], torch.float32)
    assert packed_weight is weight and packed_bias is bias


def test_pack_parameters_is_one_copy_launch_each_way():
    tensors = _params((6, 4), (6, 4), (6,), (6,), (2, 4))
    with OpTrace() as trace:
        packed = ops.pack_parameters([tensors[:2], tensors[2:4], tensors[4:]], torch.float16)
        torch.autograd.backward(list(packed), [torch.ones_like(t) for t in packed])
    counts = trace.counts()
    assert counts["aten::_foreach_copy_"] == 2, counts
    assert not [name for name in counts if name in ("aten::_to_copy", "aten::cat", "aten::copy_")], counts


def test_pack_parameters_checks_its_arguments():
    weight, bias = _params((4, 3), (4,))
    with pytest.raises(TypeError, match="dtype"):
        ops.pack_parameters([[weight]], torch.int32)
    with pytest.raises(ValueError, match="groups"):
        ops.pack_parameters([], torch.float16)
    with pytest.raises(ValueError, match="groups"):
        ops.pack_parameters([[]], torch.float16)
    with pytest.raises(ValueError, match=r"groups\[0\]\[1\]"):
        ops.pack_parameters([[weight, bias]], torch.float16)
    with pytest.raises(TypeError, match=r"groups\[0\]\[0\]"):
        ops.pack_parameters([[weight.long()]], torch.float16)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(9, 7), (2, 5, 7)], ids=["2d", "3d"])
def test_linear_matches_f_linear_with_and_without_the_residual(shape, bias):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    weight, b = _params((6, 7), (6,))
    b = b if bias else None
    reference_x = x.detach().clone().requires_grad_()
    reference_w = weight.detach().clone().requires_grad_()
    reference_b = b.detach().clone().requires_grad_() if bias else None

    out, residual = ops.linear(x, weight, b, return_residual=True)
    expected = F.linear(reference_x, reference_w, reference_b)
    _close(out, expected)
    assert torch.equal(residual, x) and residual.grad_fn is not None  # the alias carries its gradient to the op
    grad_out, grad_residual = torch.randn_like(out), torch.randn_like(x)
    torch.autograd.backward([out, residual], [grad_out, grad_residual])
    torch.autograd.backward([expected, reference_x], [grad_out, grad_residual])
    _close(x.grad, reference_x.grad)
    _close(weight.grad, reference_w.grad)
    if bias:
        _close(b.grad, reference_b.grad)

    plain = ops.linear(x.detach(), weight.detach(), None if b is None else b.detach())
    _close(plain, expected.detach())


def test_linear_residual_gradient_is_folded_into_the_dx_gemm():
    x = torch.randn(16, 8, device=DEVICE, requires_grad=True)
    weight, bias = _params((12, 8), (12,))
    with OpTrace() as trace:
        out, residual = ops.linear(x, weight, bias, return_residual=True)
        (out.sum() + (residual * 2).sum()).backward()
    counts = trace.counts()
    backward = [record.name for record in trace.records if record.backward]
    assert "aten::addmm" in backward and "aten::add" not in backward, counts  # no separate (M, K) add
    _close(x.grad, weight.detach().sum(0).expand(16, 8) + 2)


def test_linear_checks_its_arguments():
    x = torch.randn(4, 3, device=DEVICE)
    weight = torch.randn(5, 3, device=DEVICE)
    with pytest.raises(TypeError, match="weight"):
        ops.linear(x, weight.half())
    with pytest.raises(ValueError, match="weight"):
        ops.linear(x, torch.randn(5, 4, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, weight, torch.randn(4, device=DEVICE))
    with pytest.raises(TypeError, match="x"):
        ops.linear(x.long(), weight)
    with pytest.raises(ValueError, match="x"):
        ops.linear(torch.tensor(1.0, device=DEVICE), weight)
