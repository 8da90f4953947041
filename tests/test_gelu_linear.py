"""gelu_linear against float64 references (DESIGN.md's accuracy rule): values and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES

from electra_triton.ops import gelu_linear, gelu_linear_reference


def _value_and_grads(fn, tensors, grad_out, dtype=None):
    """fn(*leaves) and d(out . grad_out)/d leaf for every tensor leaf (None stays None), leaves cast to `dtype`."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves if leaf is not None]


def _inputs(lead, K, N, dtype, bias=True):
    x = torch.randn(*lead, K, device=DEVICE, dtype=dtype)
    weight = (torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    return x, weight, b


def _check(x, weight, bias, approximate, factor=2.0):
    fn = lambda x, w, b: gelu_linear(x, w, b, approximate)
    ref = lambda x, w, b: gelu_linear_reference(x, w, b, approximate)
    grad_out = torch.randn(*x.shape[:-1], weight.shape[0], device=DEVICE)
    ours, ours_grads = _value_and_grads(fn, (x, weight, bias), grad_out)
    plain, plain_grads = _value_and_grads(ref, (x, weight, bias), grad_out)
    exact, exact_grads = _value_and_grads(ref, (x, weight, bias), grad_out, torch.float64)
    names = ["dx", "dweight", "dbias"][: len(ours_grads)]
    assert_accurate("y", ours, plain, exact, factor)
    for name, o, p, e in zip(names, ours_grads, plain_grads, exact_grads):
        assert o.dtype == x.dtype, f"{name}: dtype {o.dtype}"
        assert_accurate(name, o, p, e, factor)


CASES = {
    "M1": ((1,), 40, 24, "none", True),
    "M37-tanh-nobias": ((37,), 40, 24, "tanh", False),
    "BLH": ((2, 3, 5), 40, 24, "none", True),
    "multi-tile-splitK": ((128,), 20, 40, "tanh", True),  # several tiles, masked K steps, the split-K dW path
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case, dtype):
    lead, K, N, approximate, bias = case
    _check(*_inputs(lead, K, N, dtype, bias), approximate)


def test_noncontiguous_inputs():
    x = torch.randn(24, 5, 3, device=DEVICE).transpose(0, 2)  # (3, 5, 24), not viewable as (15, 24)
    weight = torch.randn(40, 24, device=DEVICE).t()  # (24, 40) view: K-major weight
    _check(x[..., :20], weight[:, :20], torch.randn(24, device=DEVICE), "none")


def test_single_grad_paths_and_no_grad():
    x, weight, bias = _inputs((9,), 40, 24, torch.float32)
    expected = gelu_linear_reference(x.double(), weight.double(), bias.double())
    with torch.no_grad():  # no pre-activation saved
        torch.testing.assert_close(gelu_linear(x, weight, bias), expected.float(), rtol=1e-5, atol=1e-5)
    weight.requires_grad_()
    gelu_linear(x, weight, bias).sum().backward()  # x needs no gradient: the dX GEMM is skipped
    w64 = weight.detach().double().requires_grad_()
    gelu_linear_reference(x.double(), w64, bias.double()).sum().backward()
    torch.testing.assert_close(weight.grad, w64.grad.float(), rtol=1e-5, atol=1e-5)


def test_backward_fills_no_zero_gradient_for_the_saved_pre_activation():
    from electra_triton.tracing import OpTrace

    x, weight, bias = _inputs((6,), 32, 16, torch.float32)
    x.requires_grad_()
    y = gelu_linear(x, weight, bias)
    with OpTrace() as trace:
        y.backward(torch.ones_like(y))
    counts = trace.counts()
    assert not {"aten::zeros", "aten::zeros_like", "aten::fill_", "aten::full", "aten::new_zeros"} & counts.keys(), \
        counts
    assert x.grad is not None


def test_empty_batch():
    x, weight, bias = _inputs((0,), 40, 24, torch.float32)
    assert gelu_linear(x, weight, bias).shape == (0, 24)


def test_matches_torch_default_gelu_exactly_in_fp32():
    x, weight, bias = _inputs((5,), 16, 8, torch.float32)
    torch.testing.assert_close(gelu_linear(x, weight, bias), F.gelu(F.linear(x, weight, bias)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, error, name", [
    (lambda x, w, b: gelu_linear(x, w[:, :-1], b), ValueError, "weight"),
    (lambda x, w, b: gelu_linear(x, w, b[:-1]), ValueError, "bias"),
    (lambda x, w, b: gelu_linear(x, w, b, approximate="fast"), ValueError, "approximate"),
    (lambda x, w, b: gelu_linear(x, w.half(), b), TypeError, "weight"),
    (lambda x, w, b: gelu_linear(x, w, b.double()), TypeError, "bias"),
    (lambda x, w, b: gelu_linear(x.long(), w, b), TypeError, "x"),
    (lambda x, w, b: gelu_linear(x, w.unsqueeze(0), b), ValueError, "weight"),
])
def test_bad_inputs(bad, error, name):
    with pytest.raises(error, match=name):
        bad(*_inputs((3,), 8, 4, torch.float32))


def test_opcheck_fake_and_autograd_registration():
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    weight, bias = torch.randn(24, 40, device=DEVICE, requires_grad=True), torch.randn(24, device=DEVICE)
    forward = torch.ops.electra_triton.gelu_linear_forward.default
    torch.library.opcheck(forward, (x, weight, bias.requires_grad_(), 1, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(37,), (2, 3, 5)], ids=["M37", "BLH"])
def test_residual_gradient_is_folded_into_the_dx_gemm(lead, dtype):
    # y, residual = gelu_linear(x, ..., return_residual=True): x's gradient is dY's path plus the residual's, against
    # the float64 reference of gelu_linear(x) and x used twice.
    x, weight, bias = _inputs(lead, 40, 24, dtype)
    grad_out = torch.randn(*lead, 24, device=DEVICE)
    grad_residual = torch.randn(*lead, 40, device=DEVICE)

    def run(fn, cast=None):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (x, weight, bias)]
        out, residual = fn(*leaves)
        torch.autograd.backward([out, residual], [grad_out.to(out.dtype), grad_residual.to(out.dtype)])
        return out.detach(), [leaf.grad for leaf in leaves]

    ours = lambda x, w, b: gelu_linear(x, w, b, "none", return_residual=True)
    reference = lambda x, w, b: (gelu_linear_reference(x, w, b), x)
    out, grads = run(ours)
    plain, plain_grads = run(reference)
    exact, exact_grads = run(reference, torch.float64)
    assert_accurate("y", out, plain, exact)
    for name, o, p, e in zip(["dx", "dweight", "dbias"], grads, plain_grads, exact_grads, strict=True):
        assert_accurate(name, o, p, e)


def test_residual_alone_and_no_grad():
    x, weight, bias = _inputs((5,), 8, 4, torch.float32)
    x.requires_grad_()
    out, residual = gelu_linear(x, weight, bias, return_residual=True)
    assert torch.equal(residual, x)
    residual.sum().backward()  # only the residual is used: its gradient passes through
    assert torch.equal(x.grad, torch.ones_like(x))
    with torch.no_grad():
        out, residual = gelu_linear(x, weight, bias, return_residual=True)
    assert residual is x
    torch.testing.assert_close(out, gelu_linear_reference(x, weight, bias))
