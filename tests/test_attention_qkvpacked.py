"""attention_qkvpacked / attention_varlen_qkvpacked: q, k, v read by strides out of one fused-projection tensor.

Against a float64 reference on views of the same tensor: outputs and the one qkv gradient; masks incl. a row with no
real key, non-contiguous qkv, dropout through the debug keep-masks, max_seqlen given as an upper bound, the structure
of the backward (one gradient buffer written by the kernels), torch.compile tracing, bad input.
"""

import pytest
import torch
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES
from test_attention import key_mask

from electra_triton.ops import (
    attention_qkvpacked,
    attention_qkvpacked_with_dropout_mask,
    attention_reference,
    attention_varlen_qkvpacked,
    attention_varlen_qkvpacked_with_dropout_mask,
    attention_varlen_reference,
)
from electra_triton.tracing import OpTrace

HEADS, HEAD_DIM = 2, 32


def projection_output(batch, seqlen, dtype):
    """The leaf a fused QKV GEMM would produce, (B, L, 3 * H * D), and its (B, L, 3, H, D) view."""
    leaf = torch.randn(batch, seqlen, 3 * HEADS * HEAD_DIM, device=DEVICE).to(dtype).requires_grad_()
    return leaf, leaf.view(batch, seqlen, 3, HEADS, HEAD_DIM)


def reference_run(leaf, view_of, grad, dtype, upcast=True, **kwargs):
    """attention_reference on q, k, v views of a copy of `leaf` in `dtype` -> (out (B, L, H, D), leaf gradient)."""
    copy = leaf.detach().to(dtype).requires_grad_()
    q, k, v = (view_of(copy)[:, :, i].transpose(1, 2) for i in range(3))
    out = attention_reference(q, k, v, upcast=upcast, **kwargs).transpose(1, 2)
    out.backward(grad.to(dtype))
    return out.detach(), copy.grad


def assert_matches_reference(ours, leaf, view_of, grad, **kwargs):
    """ours = (out, leaf gradient) of the kernel; checked under the accuracy rule in leaf's dtype."""
    plain = reference_run(leaf, view_of, grad, leaf.dtype, upcast=False, **kwargs)
    exact = reference_run(leaf, view_of, grad, torch.float64, **kwargs)
    for name, a, b, c in zip(("out", "d_qkv"), ours, plain, exact):
        assert a.dtype == leaf.dtype
        assert_accurate(name, a, b, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "left", "holes", "all_masked_row"])
def test_padded_matches_reference(dtype, mask_kind):
    batch, seqlen = 2, 20
    leaf, qkv = projection_output(batch, seqlen, dtype)
    mask = key_mask(mask_kind, batch, seqlen)
    grad = torch.randn(batch, seqlen, HEADS, HEAD_DIM, device=DEVICE)
    out = attention_qkvpacked(qkv, mask)
    assert out.shape == (batch, seqlen, HEADS, HEAD_DIM) and out.is_contiguous()
    out.backward(grad.to(dtype))
    view_of = lambda t: t.view(batch, seqlen, 3, HEADS, HEAD_DIM)  # noqa: E731
    assert_matches_reference((out.detach(), leaf.grad), leaf, view_of, grad, attention_mask=mask)
    if mask_kind == "all_masked_row":
        assert (out[0] == 0).all() and (leaf.grad[0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_qkv(dtype):
    """qkv as a permuted view with a non-unit stride along D; the gradient still comes back in qkv's shape."""
    batch, seqlen = 1, 17
    leaf = torch.randn(batch, 3, HEADS, seqlen, 2 * HEAD_DIM, device=DEVICE).to(dtype).requires_grad_()
    view_of = lambda t: t.permute(0, 3, 1, 2, 4)[..., ::2]  # noqa: E731  (B, L, 3, H, D)
    qkv = view_of(leaf)
    assert not qkv.is_contiguous() and qkv.stride(-1) == 2
    mask = key_mask("right", batch, seqlen)
    grad = torch.randn(batch, seqlen, HEADS, HEAD_DIM, device=DEVICE)
    out = attention_qkvpacked(qkv, mask, scale=0.3)
    out.backward(grad.to(dtype))
    assert_matches_reference((out.detach(), leaf.grad), leaf, view_of, grad, attention_mask=mask, scale=0.3)
    assert (leaf.grad[..., 1::2] == 0).all()


def test_backward_writes_one_gradient_buffer():
    """Autograd on qkv[:, :, i] views zero-fills three qkv-sized buffers and adds them; the op's backward is one
    custom op whose output is the qkv gradient, and the output reshapes to (B, L, H * D) without a copy."""
    batch, seqlen = 1, 8
    leaf, qkv = projection_output(batch, seqlen, torch.float32)
    with OpTrace() as forward:
        out = attention_qkvpacked(qkv)
    assert forward.counts() == {"electra_triton::attention_qkvpacked_forward": 1}, forward.counts()  # no L x L mask
    flat = out.reshape(batch, seqlen, HEADS * HEAD_DIM)
    assert flat.data_ptr() == out.data_ptr() and flat._base is out
    grad = torch.ones_like(out)
    with OpTrace() as trace:
        out.backward(grad)
    assert trace.counts() == {"electra_triton::attention_qkvpacked_backward": 1}, trace.counts()
    assert leaf.grad.shape == leaf.shape

    with OpTrace() as per_view:  # the structure the op avoids: a zero-filled buffer per view, then adds
        q, k, v = (qkv[:, :, i] for i in range(3))
        (q * k * v).sum().backward()
    counts = per_view.counts()
    assert counts["aten::select_backward"] == 3 and counts["aten::add"] == 2, counts


@pytest.mark.parametrize("dtype, dropout_p", [
    pytest.param(torch.float32, 0.0, id="float32"),
    pytest.param(torch.float16, 0.3, id="float16-dropout"),
    pytest.param(torch.bfloat16, 0.3, id="bfloat16-dropout", marks=DTYPES[2].marks),
])
def test_varlen_with_max_seqlen_bound_equals_padded(dtype, dropout_p):
    """max_seqlen = the padded length L (> the longest sequence): the same output, gradient and (same seed) dropout
    mask as the padded op on the right-padded batch, so forward and backward agree on the mask."""
    lengths, seqlen = [13, 0, 5], 16
    mask = torch.tensor([[i < n for i in range(seqlen)] for n in lengths], device=DEVICE)
    leaf, qkv = projection_output(len(lengths), seqlen, dtype)
    grad = torch.randn(len(lengths), seqlen, HEADS, HEAD_DIM, device=DEVICE).to(dtype) * mask[:, :, None, None]
    torch.manual_seed(5)
    padded_out = attention_qkvpacked(qkv, mask, dropout_p)
    padded_out.backward(grad)

    packed_leaf = leaf.detach()[mask].requires_grad_()  # (T, 3 * H * D)
    cu_seqlens = torch.tensor([0, 13, 13, 18], dtype=torch.int32, device=DEVICE)
    torch.manual_seed(5)
    out = attention_varlen_qkvpacked(packed_leaf.view(-1, 3, HEADS, HEAD_DIM), cu_seqlens, seqlen, dropout_p)
    assert out.shape == (18, HEADS, HEAD_DIM) and out.is_contiguous()
    out.backward(grad[mask])
    torch.testing.assert_close(out.detach(), padded_out.detach()[mask], rtol=0, atol=0)
    torch.testing.assert_close(packed_leaf.grad, leaf.grad[mask], rtol=0, atol=0)


@pytest.mark.parametrize("max_seqlen", [13, 24], ids=["exact", "bound"])
def test_varlen_dropout_matches_reference_with_the_kernels_mask(max_seqlen):
    lengths, p = [13, 0, 6], 0.25
    cu_seqlens = torch.tensor([0, 13, 13, 19], dtype=torch.int32, device=DEVICE)
    leaf = torch.randn(19, 3 * HEADS * HEAD_DIM, device=DEVICE, requires_grad=True)
    view_of = lambda t: t.view(-1, 3, HEADS, HEAD_DIM)  # noqa: E731
    grad = torch.randn(19, HEADS, HEAD_DIM, device=DEVICE)
    out, keep = attention_varlen_qkvpacked_with_dropout_mask(view_of(leaf), cu_seqlens, max_seqlen, p)
    assert keep.shape == (len(lengths), HEADS, max_seqlen, max_seqlen) and keep.dtype == torch.bool
    out.backward(grad)  # regenerates the mask from the seed

    copy = leaf.detach().double().requires_grad_()
    expected = attention_varlen_reference(*view_of(copy).unbind(1), cu_seqlens, max_seqlen, p, dropout_mask=keep)
    expected.backward(grad.double())
    torch.testing.assert_close(out.detach(), expected.detach().float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, copy.grad.float(), rtol=1e-5, atol=1e-5)
    used = keep[0, :, :13, :13]
    assert 0.5 < used.float().mean().item() < 0.95  # the mask actually dropped something


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_dropout_matches_reference_with_the_kernels_mask(dtype):
    batch, seqlen, p = 1, 19, 0.25
    leaf, qkv = projection_output(batch, seqlen, dtype)
    mask = key_mask("holes", batch, seqlen)
    grad = torch.randn(batch, seqlen, HEADS, HEAD_DIM, device=DEVICE)
    out, keep = attention_qkvpacked_with_dropout_mask(qkv, mask, p)
    assert keep.shape == (batch, HEADS, seqlen, seqlen)
    out.backward(grad.to(dtype))
    view_of = lambda t: t.view(batch, seqlen, 3, HEADS, HEAD_DIM)  # noqa: E731
    assert_matches_reference((out.detach(), leaf.grad), leaf, view_of, grad, attention_mask=mask, dropout_p=p,
                             dropout_mask=keep)


def test_unsupported_head_dim_runs_the_reference():
    batch, seqlen, head_dim = 1, 6, 40
    leaf = torch.randn(batch, seqlen, 3 * HEADS * head_dim, device=DEVICE, requires_grad=True)
    with pytest.warns(UserWarning, match="head dim 40"):
        out = attention_qkvpacked(leaf.view(batch, seqlen, 3, HEADS, head_dim))
    q, k, v = leaf.view(batch, seqlen, 3, HEADS, head_dim).unbind(2)
    torch.testing.assert_close(out, attention_reference(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2))
    assert out.is_contiguous()  # as the kernel's output: the patched layer .view()s it
    out.sum().backward()
    assert leaf.grad.shape == leaf.shape and leaf.grad.abs().sum() > 0


def test_traces_fullgraph_with_fake_implementations():
    """torch.compile(fullgraph=True) traces both ops (forward and backward through their fake implementations)."""
    leaf, qkv = projection_output(1, 8, torch.float32)
    packed = leaf.detach().view(-1, 3, HEADS, HEAD_DIM).requires_grad_()
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    mask = key_mask("right", 1, 8)

    def step(qkv, packed):
        return (attention_qkvpacked(qkv, mask, 0.1).sum()
                + attention_varlen_qkvpacked(packed, cu_seqlens, 8, 0.1).sum())

    torch.compile(step, fullgraph=True, backend="aot_eager")(qkv, packed).backward()
    assert leaf.grad.shape == leaf.shape and packed.grad.shape == packed.shape


def test_opcheck_fake_and_autograd_registration():
    qkv = torch.randn(1, 8, 3, HEADS, HEAD_DIM, device=DEVICE, requires_grad=True)
    mask = torch.ones(1, 8, dtype=torch.int8, device=DEVICE)
    forward = torch.ops.electra_triton.attention_qkvpacked_forward.default
    torch.library.opcheck(forward, (qkv, mask, None, 8, 0.2, 0.1, torch.tensor([5, 6]), False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _packed(shape=(1, 8, 3, HEADS, HEAD_DIM)):
    return torch.randn(shape, device=DEVICE)


_CU = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("call, error, match", [
    (lambda qkv: attention_qkvpacked(qkv[0]), ValueError, r"qkv must have shape \(B, L, 3, H, D\)"),
    (lambda qkv: attention_qkvpacked(qkv[:, :, :2]), ValueError, r"qkv must have shape \(B, L, 3, H, D\)"),
    (lambda qkv: attention_qkvpacked(qkv.long()), TypeError, "qkv must be float32"),
    (lambda qkv: attention_qkvpacked("qkv"), TypeError, "qkv must be a torch.Tensor"),
    (lambda qkv: attention_qkvpacked(qkv, torch.ones(1, 9, device=DEVICE)), ValueError,
     "attention_mask must have shape"),
    (lambda qkv: attention_qkvpacked(qkv, dropout_p=1.0), ValueError, "dropout_p must be in"),
    (lambda qkv: attention_qkvpacked(qkv, scale=float("nan")), TypeError, "scale must be"),
    (lambda qkv: attention_varlen_qkvpacked(qkv, _CU, 8), ValueError, r"qkv must have shape \(T, 3, H, D\)"),
    (lambda qkv: attention_varlen_qkvpacked(qkv[0], _CU.long(), 8), TypeError, "cu_seqlens must be int32"),
    (lambda qkv: attention_varlen_qkvpacked(qkv[0], _CU, 8.0), TypeError, "max_seqlen must be an int"),
    (lambda qkv: attention_varlen_qkvpacked(qkv[0], _CU, -1), ValueError, "max_seqlen must be in"),
    (lambda qkv: attention_varlen_qkvpacked(qkv[0], _CU.to("meta"), 8), ValueError, "cu_seqlens is on meta"),
    (lambda qkv: attention_varlen_qkvpacked_with_dropout_mask(qkv[0], _CU, 8, dropout_p=2), ValueError,
     "dropout_p must be in"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(_packed())
