"""dropout_add_layer_norm against float64 references (DESIGN.md's accuracy rule), values and every gradient; dropout
checked through the debug mask."""

import pytest
import torch
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES
from torch._subclasses.fake_tensor import FakeTensorMode

from electra_triton.ops import (
    dropout_add_layer_norm,
    dropout_add_layer_norm_reference,
    dropout_add_layer_norm_with_mask,
)
from electra_triton.tracing import OpTrace

EPS = 1e-12  # ELECTRA's layer_norm_eps


def _value_and_grads(fn, tensors, grad_out, dtype=None):
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves if leaf is not None]


def _inputs(shape, dtype, residual=True, affine=True, param_dtype=None):
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    res = torch.randn(shape, device=DEVICE, dtype=dtype) if residual else None
    weight = (1 + 0.1 * torch.randn(n, device=DEVICE)).to(param_dtype or dtype) if affine else None
    bias = (0.1 * torch.randn(n, device=DEVICE)).to(param_dtype or dtype) if affine else None
    return x, res, weight, bias


def _x_bias(n, dtype):
    # A linear layer's bias: comparable to x, so that leaving it out would fail every check.
    return torch.randn(n, device=DEVICE).to(dtype)


def _check(x, res, weight, bias, dropout_p, x_bias=None):
    # The kernel's own mask, read back from the debug entry point, makes the references apply the same dropout; the
    # same seed makes the kernel draw that mask again below.
    torch.manual_seed(1234)
    _, keep = dropout_add_layer_norm_with_mask(x, res, weight, bias, EPS, dropout_p, x_bias=x_bias)
    if dropout_p == 0:
        assert keep.all()
    fn = lambda x, res, weight, bias, x_bias: dropout_add_layer_norm_with_mask(
        x, res, weight, bias, EPS, dropout_p, x_bias=x_bias)[0]
    ref = lambda x, res, weight, bias, x_bias: dropout_add_layer_norm_reference(
        x, res, weight, bias, EPS, dropout_p, keep, x_bias=x_bias)
    # Rounded to x's dtype for every run: the float64 reference then sees the gradient the kernel sees, which keeps
    # fp32 weight/bias gradients of 16-bit activations comparable under the fp32 rule.
    grad_out = torch.randn(x.shape, device=DEVICE).to(x.dtype)
    inputs = {"dx": x, "dresidual": res, "dweight": weight, "dbias": bias, "dx_bias": x_bias}
    torch.manual_seed(1234)
    ours, ours_grads = _value_and_grads(fn, inputs.values(), grad_out)
    plain, plain_grads = _value_and_grads(ref, inputs.values(), grad_out)
    exact, exact_grads = _value_and_grads(ref, inputs.values(), grad_out, torch.float64)
    given = {name: leaf for name, leaf in inputs.items() if leaf is not None}
    assert_accurate("y", ours, plain, exact)
    assert len(ours_grads) == len(given)
    for (name, leaf), o, p, e in zip(given.items(), ours_grads, plain_grads, exact_grads):
        assert o.dtype == leaf.dtype, f"{name}: dtype {o.dtype}"
        assert_accurate(name, o, p, e)


CASES = {  # shape, residual, dropout_p
    "M37-N40": ((37, 40), True, 0.0),
    "M1-N256-dropout": ((1, 256), True, 0.2),
    "BLH-N24-embeddings": ((2, 3, 24), False, 0.0),
    "N768-dropout-embeddings": ((5, 768), False, 0.1),
    "rows-loop-N40-dropout": ((70, 40), True, 0.3),  # several row blocks per backward program
    "N3-dropout": ((9, 3), True, 0.3),  # narrower than one Philox call's four columns
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case, dtype):
    shape, residual, dropout_p = case
    x, res, weight, bias = _inputs(shape, dtype, residual)
    _check(x, res, weight, bias, dropout_p)


MIXED_DTYPES = [pytest.param(torch.float16, id="float16"), DTYPES[2]]


@pytest.mark.parametrize("dtype", MIXED_DTYPES)
@pytest.mark.parametrize("case", [CASES["M37-N40"], CASES["rows-loop-N40-dropout"], CASES["BLH-N24-embeddings"]],
                         ids=["M37-N40", "rows-loop-N40-dropout", "BLH-N24-embeddings"])
def test_16bit_activations_with_fp32_parameters(case, dtype):
    """The residual stream under autocast: y, d_x, d_residual in the 16-bit dtype (2x rule), d_weight and d_bias in
    fp32 (fp32 rule: they are sums over rows of fp32 products of the 16-bit inputs)."""
    shape, residual, dropout_p = case
    x, res, weight, bias = _inputs(shape, dtype, residual, param_dtype=torch.float32)
    _check(x, res, weight, bias, dropout_p)


X_BIAS_CASES = {  # shape, residual, dropout_p, affine
    "M37-N100-dropout": ((37, 100), True, 0.2, True),
    "BLH-N37": ((2, 5, 37), True, 0.0, True),
    "N37-dropout-embeddings": ((11, 37), False, 0.1, True),
    "N100-dropout-no-affine": ((6, 100), True, 0.3, False),
    "rows-loop-N601-dropout": ((37, 601), True, 0.1, True),  # BLOCK_M 4: backward programs loop over 3 row blocks
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", X_BIAS_CASES.values(), ids=X_BIAS_CASES.keys())
def test_x_bias_matches_reference(case, dtype):
    shape, residual, dropout_p, affine = case
    x, res, weight, bias = _inputs(shape, dtype, residual, affine)
    _check(x, res, weight, bias, dropout_p, _x_bias(shape[-1], dtype))


@pytest.mark.parametrize("dtype", MIXED_DTYPES)
@pytest.mark.parametrize("case", [X_BIAS_CASES["M37-N100-dropout"], X_BIAS_CASES["rows-loop-N601-dropout"]],
                         ids=["M37-N100-dropout", "rows-loop-N601-dropout"])
def test_x_bias_fp32_with_16bit_activations(case, dtype):
    """The encoder's output layers under autocast: 16-bit x and residual, the linear layer's bias and the LayerNorm
    parameters in fp32; d_x_bias in fp32 (fp32 rule, like d_weight and d_bias)."""
    shape, residual, dropout_p, affine = case
    x, res, weight, bias = _inputs(shape, dtype, residual, affine, param_dtype=torch.float32)
    _check(x, res, weight, bias, dropout_p, _x_bias(shape[-1], torch.float32))


def test_x_bias_gradient_comes_from_the_fused_backward():
    """d_x_bias is a column sum of the fused backward pass, not an autograd add + sum around the op."""
    x, res, weight, bias = (t.requires_grad_() for t in _inputs((8, 40), torch.float32))
    x_bias = _x_bias(40, torch.float32).requires_grad_()
    grad_out = torch.randn(8, 40, device=DEVICE)
    with OpTrace() as trace:
        dropout_add_layer_norm(x, res, weight, bias, EPS, 0.1, x_bias=x_bias).backward(grad_out)
    assert trace.counts() == {"electra_triton::dropout_add_layer_norm_forward": 1,
                              "electra_triton::dropout_add_layer_norm_backward": 1}
    assert x_bias.grad is not None and x_bias.grad.shape == (40,)


def test_mixed_dtypes_save_only_16bit_activations():
    x, res, weight, bias = (t.requires_grad_() for t in _inputs((4, 40), torch.float16, param_dtype=torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout_add_layer_norm(x, res, weight, bias, EPS, 0.1)
    assert y.dtype == torch.float16
    activations = [t for t in saved if t.shape == x.shape]
    statistics = [t for t in saved if t.shape == (4,)]
    assert [t.dtype for t in activations] == [torch.float16, torch.float16]
    assert [t.dtype for t in statistics] == [torch.float32, torch.float32]
    assert all(t is weight or t is bias for t in saved if t.shape == (40,))


def test_no_affine_and_noncontiguous():
    x = torch.randn(40, 6, device=DEVICE).t()  # (6, 40), column stride 6
    res = torch.randn(6, 80, device=DEVICE)[:, ::2]
    _check(x, res, None, None, 0.0)


def test_dropout_mask_rate_and_reproducibility():
    x, res, weight, bias = _inputs((64, 256), torch.float32)
    torch.manual_seed(7)
    y1, keep1 = dropout_add_layer_norm_with_mask(x, res, weight, bias, EPS, 0.25)
    y_plain = dropout_add_layer_norm(x, res, weight, bias, EPS, 0.25)  # next draw: another mask
    torch.manual_seed(7)
    y2, keep2 = dropout_add_layer_norm_with_mask(x, res, weight, bias, EPS, 0.25)
    torch.manual_seed(7)
    y3 = dropout_add_layer_norm(x, res, weight, bias, EPS, 0.25)
    assert torch.equal(keep1, keep2) and torch.equal(y1, y2) and torch.equal(y1, y3)
    assert not torch.equal(y1, y_plain)
    assert abs(keep1.float().mean().item() - 0.75) < 0.02
    assert keep1.float().mean(0).min() > 0.1 and keep1.float().mean(1).max() < 0.95  # not constant along rows/cols
    # Columns 4g..4g+3 take the four outputs of one Philox call: neighbours are kept together at the independent rate.
    both = (keep1[:, 1:] & keep1[:, :-1]).float().mean().item()
    assert abs(both - 0.75 ** 2) < 0.02, both
    by_output = keep1.reshape(64, -1, 4).float().mean(dim=(0, 1))
    assert (by_output - 0.75).abs().max() < 0.03, by_output


def test_empty_rows():
    x, res, weight, bias = _inputs((0, 24), torch.float32)
    assert dropout_add_layer_norm(x, res, weight, bias, EPS).shape == (0, 24)


@pytest.mark.parametrize("bad, error, name", [
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, 0.0), ValueError, "eps"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, -1e-5), ValueError, "eps"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, "1e-5"), TypeError, "eps"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, 1.0), ValueError, "dropout_p"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, -0.1), ValueError, "dropout_p"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r[:, :-1], w, b, EPS), ValueError, "residual"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r.half(), w, b, EPS), TypeError, "residual"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w[:-1], b, EPS), ValueError, "weight"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b.double(), EPS), TypeError, "bias"),
    (lambda x, r, w, b: dropout_add_layer_norm(x.half(), r.half(), w.bfloat16(), b.half(), EPS), TypeError,
     "weight must have x's dtype"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w.half(), b, EPS), TypeError, "weight"),
    (lambda x, r, w, b: dropout_add_layer_norm(x.int(), r, w, b, EPS), TypeError, "x"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, x_bias=b[:-1]), ValueError, "x_bias"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, x_bias=b[None]), ValueError, "x_bias"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, x_bias=b.double()), TypeError, "x_bias"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, x_bias=b.int()), TypeError, "x_bias"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, x_bias=b.tolist()), TypeError, "x_bias"),
    (lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, EPS, x_bias=b.to("meta")), ValueError, "x_bias"),
    (lambda x, r, w, b: dropout_add_layer_norm(x.half(), r.half(), w.half(), b.half(), EPS, x_bias=b.bfloat16()),
     TypeError, "x_bias must have x's dtype"),
])
def test_bad_inputs(bad, error, name):
    with pytest.raises(error, match=name):
        bad(*_inputs((3, 8), torch.float32))


@pytest.mark.parametrize("with_x_bias", [False, True], ids=["no-x_bias", "x_bias"])
def test_opcheck_fake_and_autograd_registration(with_x_bias):
    x, residual = (torch.randn(6, 40, device=DEVICE, requires_grad=True) for _ in range(2))
    x_bias, weight, bias = (torch.randn(40, device=DEVICE, requires_grad=True) for _ in range(3))
    forward = torch.ops.electra_triton.dropout_add_layer_norm_forward.default
    args = (x, x_bias if with_x_bias else None, residual, weight, bias, 1e-5, 0.1, torch.tensor([3, 4]), False)
    torch.library.opcheck(forward, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fake_backward_matches_the_kernel():
    """The anatomy traces with fake tensors: the backward's fake outputs have the real ones' shapes and dtypes."""
    x, residual = (torch.randn(6, 40, device=DEVICE, dtype=torch.float16) for _ in range(2))
    x_bias, weight, bias = (torch.randn(40, device=DEVICE) for _ in range(3))
    forward = torch.ops.electra_triton.dropout_add_layer_norm_forward.default
    backward = torch.ops.electra_triton.dropout_add_layer_norm_backward.default
    rng = torch.tensor([3, 4])
    _, mean, rstd, _ = forward(x, x_bias, residual, weight, bias, 1e-5, 0.1, rng, False)
    for args in [(torch.randn_like(x), x, x_bias, residual, weight, bias, mean, rstd, 0.1, rng),
                 (torch.randn_like(x), x, None, None, None, bias, mean, rstd, 0.1, rng)]:
        real = backward(*args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = backward(*args)
        assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
