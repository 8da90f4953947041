"""dropout_add_layer_norm against float64 references (DESIGN.md's accuracy rule), values and every gradient; dropout
checked through the debug mask."""

import pytest
import torch
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES

from electra_triton.ops import (
    dropout_add_layer_norm,
    dropout_add_layer_norm_reference,
    dropout_add_layer_norm_with_mask,
)

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


def _check(x, res, weight, bias, dropout_p):
    # The kernel's own mask, read back from the debug entry point, makes the references apply the same dropout; the
    # same seed makes the kernel draw that mask again below.
    torch.manual_seed(1234)
    _, keep = dropout_add_layer_norm_with_mask(x, res, weight, bias, EPS, dropout_p)
    if dropout_p == 0:
        assert keep.all()
    fn = lambda *t: dropout_add_layer_norm_with_mask(*t, EPS, dropout_p)[0]
    ref = lambda *t: dropout_add_layer_norm_reference(*t, EPS, dropout_p, keep)
    # Rounded to x's dtype for every run: the float64 reference then sees the gradient the kernel sees, which keeps
    # fp32 weight/bias gradients of 16-bit activations comparable under the fp32 rule.
    grad_out = torch.randn(x.shape, device=DEVICE).to(x.dtype)
    torch.manual_seed(1234)
    ours, ours_grads = _value_and_grads(fn, (x, res, weight, bias), grad_out)
    plain, plain_grads = _value_and_grads(ref, (x, res, weight, bias), grad_out)
    exact, exact_grads = _value_and_grads(ref, (x, res, weight, bias), grad_out, torch.float64)
    names = [n for n, t in zip(("dx", "dresidual", "dweight", "dbias"), (x, res, weight, bias)) if t is not None]
    assert_accurate("y", ours, plain, exact)
    for name, leaf, o, p, e in zip(names, [t for t in (x, res, weight, bias) if t is not None], ours_grads,
                                   plain_grads, exact_grads):
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
])
def test_bad_inputs(bad, error, name):
    with pytest.raises(error, match=name):
        bad(*_inputs((3, 8), torch.float32))


def test_opcheck_fake_and_autograd_registration():
    x, residual = (torch.randn(6, 40, device=DEVICE, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(40, device=DEVICE, requires_grad=True) for _ in range(2))
    forward = torch.ops.electra_triton.dropout_add_layer_norm_forward.default
    torch.library.opcheck(forward, (x, residual, weight, bias, 1e-5, 0.1, torch.tensor([3, 4]), False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
