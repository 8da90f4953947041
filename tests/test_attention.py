"""attention / attention_varlen against a float64 reference: outputs and dq, dk, dv; masks, odd lengths, head dims,
strides, dropout through the debug keep-mask, the keep rate, reproducibility, varlen against the padded op, bad input.
"""

import warnings

import pytest
import torch
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES

from electra_triton.ops import (
    attention,
    attention_reference,
    attention_varlen,
    attention_varlen_reference,
    attention_with_dropout_mask,
    pad_input,
    quantized_attention_dropout_p,
    unpad_input,
)


def key_mask(kind: str, batch: int, seqlen: int) -> torch.Tensor | None:
    """(B, L) bool key-padding masks of each pattern; the last sequence is always complete."""
    if kind == "none":
        return None
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEVICE)
    if kind == "right":
        mask[0, seqlen * 2 // 3:] = False
    elif kind == "left":
        mask[0, : seqlen // 3] = False
    elif kind == "holes":
        mask[0, 1::3] = False
        mask[0, 5:9] = False
    elif kind == "all_masked_row":
        mask[0] = False  # no real key at all: zeros and zero grads
    return mask


def hf_layout(batch, heads, seqlen, head_dim, dtype):
    """Leaves (B, L, H, D) contiguous, as HF's projections produce them; the op sees (B, H, L, D) views."""
    return [torch.randn(batch, seqlen, heads, head_dim, device=DEVICE).to(dtype).requires_grad_() for _ in range(3)]


def run(fn, leaves, grad, dtype=None, **kwargs):
    """fn on (B, H, L, D) views of copies of `leaves` converted to `dtype` -> [out (B, L, H, D), dq, dk, dv]."""
    copies = [leaf.detach().to(dtype or leaf.dtype).requires_grad_() for leaf in leaves]
    out = fn(*(c.transpose(1, 2) for c in copies), **kwargs).transpose(1, 2)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [c.grad for c in copies]


def check_against_reference(leaves, dtype, **kwargs):
    grad = torch.randn_like(leaves[0], dtype=torch.float32)
    ours = run(attention, leaves, grad, **kwargs)
    plain = run(attention_reference, leaves, grad, upcast=False, **kwargs)
    exact = run(attention_reference, leaves, grad, dtype=torch.float64, **kwargs)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        assert a.dtype == dtype
        assert_accurate(name, a, b, c)
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "holes", "all_masked_row"])
def test_masks(dtype, mask_kind):
    leaves = hf_layout(2, 2, 40, 32, dtype)
    mask = key_mask(mask_kind, 2, 40)
    out, dq, dk, dv = check_against_reference(leaves, dtype, attention_mask=mask)
    if mask_kind == "all_masked_row":
        for t in (out, dq, dk, dv):
            assert (t[0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims(dtype, head_dim):
    check_against_reference(hf_layout(1, 2, 24, head_dim, dtype), dtype, attention_mask=key_mask("holes", 1, 24))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads, seqlen", [(2, 1, 1), (1, 2, 17), (1, 1, 100)])
def test_odd_lengths(dtype, batch, heads, seqlen):
    check_against_reference(hf_layout(batch, heads, seqlen, 32, dtype), dtype,
                            attention_mask=key_mask("right", batch, seqlen))


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_strides(dtype):
    """q, k, v as slices of one fused projection with a non-unit stride along D; scale given."""
    batch, seqlen, heads, head_dim = 2, 20, 2, 32
    fused = torch.randn(batch, seqlen, 3, heads, 2 * head_dim, device=DEVICE).to(dtype)
    q, k, v = (fused[:, :, i, :, ::2].transpose(1, 2) for i in range(3))
    assert q.stride(-1) == 2
    mask = key_mask("left", batch, seqlen)
    ours = attention(q, k, v, mask, scale=0.3)
    exact = attention_reference(q.double(), k.double(), v.double(), mask, scale=0.3)
    plain = attention_reference(q, k, v, mask, scale=0.3, upcast=False)
    assert_accurate("out", ours, plain, exact)
    assert_accurate("out", attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, scale=0.3), plain, exact)


@pytest.mark.parametrize("dtype, mask_kind, seqlen", [
    pytest.param(torch.float32, "holes", 33, id="float32-holes"),  # several tiles each way
    pytest.param(torch.float16, "none", 20, id="float16"),
    pytest.param(torch.bfloat16, "holes", 33, id="bfloat16-holes", marks=DTYPES[2].marks),
])
def test_dropout_matches_reference_with_the_kernels_mask(dtype, mask_kind, seqlen):
    batch, heads, head_dim, p = 1, 2, 32, 0.25
    leaves = hf_layout(batch, heads, seqlen, head_dim, dtype)
    mask = key_mask(mask_kind, batch, seqlen)
    grad = torch.randn_like(leaves[0], dtype=torch.float32)
    copies = [leaf.detach().requires_grad_() for leaf in leaves]
    out, keep = attention_with_dropout_mask(*(c.transpose(1, 2) for c in copies), mask, dropout_p=p)
    assert keep.shape == (batch, heads, seqlen, seqlen) and keep.dtype == torch.bool
    out.transpose(1, 2).backward(grad.to(dtype))  # the backward regenerates the mask from the seed
    ours = [out.transpose(1, 2).detach()] + [c.grad for c in copies]
    kwargs = {"attention_mask": mask, "dropout_p": p, "dropout_mask": keep}
    plain = run(attention_reference, leaves, grad, upcast=False, **kwargs)
    exact = run(attention_reference, leaves, grad, dtype=torch.float64, **kwargs)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        assert_accurate(name, a, b, c)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate(p):
    q, k, v = (torch.randn(2, 2, 48, 32, device=DEVICE) for _ in range(3))
    _, keep = attention_with_dropout_mask(q, k, v, dropout_p=p)
    p = quantized_attention_dropout_p(p)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate
    heads = keep.reshape(4, -1).float()
    assert not any(torch.equal(heads[i], heads[j]) for i in range(4) for j in range(i))  # independent streams
    # Neighbouring queries of a key take different bytes of one Philox call: kept together at the independent rate.
    both = (keep[..., 1:, :] & keep[..., :-1, :]).float()
    expected = (1 - p) ** 2
    assert abs(both.mean().item() - expected) < 5 * (expected * (1 - expected) / both.numel()) ** 0.5
    by_position = keep.transpose(-1, -2).reshape(-1, 3, 16).float().mean(dim=(0, 1))  # each byte of a call
    assert (by_position - (1 - p)).abs().max() < 5 * (p * (1 - p) / (n / 16)) ** 0.5, by_position


def test_dropout_probability_is_quantised_to_8_bits():
    """The kernels drop with p' = round(256 p) / 256 and scale kept probabilities by 1 / (1 - p'): with uniform
    attention (q = 0) and v = 1, each output is (kept keys / L) / (1 - p')."""
    assert quantized_attention_dropout_p(0.1) == 26 / 256 and quantized_attention_dropout_p(0.3) == 77 / 256
    assert quantized_attention_dropout_p(0.999) == 255 / 256 and quantized_attention_dropout_p(0.001) == 0.0
    seqlen = 40
    q = torch.zeros(1, 2, seqlen, 32, device=DEVICE)
    v = torch.ones(1, 2, seqlen, 32, device=DEVICE)
    out, keep = attention_with_dropout_mask(q, torch.randn_like(q), v, dropout_p=0.3)
    expected = keep.float().sum(-1) / seqlen / (1 - 77 / 256)  # (B, H, L)
    torch.testing.assert_close(out[..., 0], expected)
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)  # unbiased


def test_dropout_reproducible_and_fresh_per_call():
    q, k, v = (torch.randn(1, 2, 24, 32, device=DEVICE) for _ in range(3))
    torch.manual_seed(7)
    first = attention(q, k, v, dropout_p=0.2)
    second = attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    again = attention(q, k, v, dropout_p=0.2)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_consecutive_calls_with_different_masks():
    leaves = hf_layout(2, 1, 24, 32, torch.float32)
    for kind in ("right", "holes", "left", "none"):
        check_against_reference(leaves, torch.float32, attention_mask=key_mask(kind, 2, 24))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_equals_padded(dtype, dropout_p):
    """Right-padded batch of length max_seqlen: identical output, grads and (same seed) dropout mask."""
    lengths, heads, head_dim = [30, 11, 0, 5], 1, 32
    seqlen = max(lengths)
    mask = torch.tensor([[i < n for i in range(seqlen)] for n in lengths], device=DEVICE)
    leaves = hf_layout(len(lengths), heads, seqlen, head_dim, dtype)
    grad = torch.randn_like(leaves[0]) * mask[:, :, None, None]

    torch.manual_seed(3)
    padded = run(attention, leaves, grad, attention_mask=mask, dropout_p=dropout_p)
    copies = [leaf.detach().requires_grad_() for leaf in leaves]
    packed = [unpad_input(c, mask) for c in copies]
    _, indices, cu_seqlens, max_seqlen = packed[0]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 30, 41, 41, 46] and max_seqlen == seqlen
    torch.manual_seed(3)
    out = attention_varlen(*(t[0] for t in packed), cu_seqlens, max_seqlen, dropout_p=dropout_p)
    assert out.shape == (sum(lengths), heads, head_dim)
    out = pad_input(out, indices, len(lengths), seqlen)
    out.backward(grad)
    keep = mask[:, :, None, None]
    for name, a, b in zip(("out", "dq", "dk", "dv"), [out.detach()] + [c.grad for c in copies], padded):
        torch.testing.assert_close(a, b * keep, rtol=0, atol=0, msg=name)
    if dropout_p == 0.0:
        exact = attention_varlen_reference(*(t[0].double() for t in packed), cu_seqlens, max_seqlen)
        plain = attention_varlen_reference(*(t[0] for t in packed), cu_seqlens, max_seqlen, upcast=False)
        assert_accurate("varlen out", unpad_input(out, mask)[0], plain, exact)


def test_unpad_pad_roundtrip_with_holes():
    hidden = torch.randn(3, 7, 4, device=DEVICE)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0] * 7, [1] * 7], device=DEVICE)
    packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
    assert packed.shape == (11, 4) and cu_seqlens.tolist() == [0, 4, 4, 11] and max_seqlen == 7
    torch.testing.assert_close(pad_input(packed, indices, 3, 7), hidden * mask[:, :, None])


def test_unsupported_head_dim_falls_back_with_one_warning():
    q, k, v = (torch.randn(1, 2, 10, 48, device=DEVICE) for _ in range(3))
    with pytest.warns(UserWarning, match="head dim 48"):
        out = attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v)
    torch.testing.assert_close(out, attention_reference(q, k, v))


def test_opcheck_fake_and_autograd_registration():
    q, k, v = (torch.randn(1, 2, 16, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 16, dtype=torch.int8, device=DEVICE)
    forward = torch.ops.electra_triton.attention_forward.default
    torch.library.opcheck(forward, (q, k, v, mask, None, 16, 0.2, 0.1, torch.tensor([5, 6]), False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _qkv(shape=(1, 2, 8, 32), dtype=torch.float32):
    return [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v: attention(q[0], k[0], v[0]), ValueError, "q must have rank 4"),
    (lambda q, k, v: attention(q, k[:, :, :4], v), ValueError, "k must have shape"),
    (lambda q, k, v: attention(q, k, v.half()), TypeError, "v has dtype"),
    (lambda q, k, v: attention(q.long(), k, v), TypeError, "q must be float32"),
    (lambda q, k, v: attention(q, k, v, torch.ones(1, 9, device=DEVICE)), ValueError, "attention_mask must have shape"),
    (lambda q, k, v: attention(q, k, v, torch.ones(1, 8, device="meta")), ValueError, "attention_mask is on meta"),
    (lambda q, k, v: attention(q, k, v, [1] * 8), TypeError, "attention_mask must be a torch.Tensor"),
    (lambda q, k, v: attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p must be in"),
    (lambda q, k, v: attention(q, k, v, dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (lambda q, k, v: attention(q, k, v, scale="x"), TypeError, "scale must be"),
    (lambda q, k, v: attention("q", k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: attention_varlen(q[0], k[0], v[0], torch.tensor([0, 8]), 8), TypeError,
     "cu_seqlens must be int32"),
    (lambda q, k, v: attention_varlen(q[0, 0], k[0, 0], v[0, 0], torch.tensor([0, 8], dtype=torch.int32), 8),
     ValueError, "q must have rank 3"),
    (lambda q, k, v: attention_varlen(q[0], k[0], v[0], torch.tensor([0, 8], dtype=torch.int32), 8.0),
     TypeError, "max_seqlen must be an int"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(*_qkv())
