"""rtd_loss against the exact computation of ElectraForPreTraining.forward, values and all three gradients."""

import logging

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES

from electra_triton.ops import _dispatch, rtd_loss, rtd_loss_reference, set_kernel_mode


def hf_rtd_loss(hidden, weight, bias, labels, attention_mask):
    """ElectraForPreTraining's loss from discriminator_predictions.dense_prediction, line for line."""
    logits = F.linear(hidden, weight, bias).squeeze(-1)
    seq_len = hidden.shape[1]
    if attention_mask is None:
        return F.binary_cross_entropy_with_logits(logits.view(-1, seq_len), labels.float())
    active = attention_mask.view(-1, seq_len) == 1
    return F.binary_cross_entropy_with_logits(logits.view(-1, seq_len)[active], labels[active].float())


def make_inputs(batch, seq_len, hidden_size, dtype, logit_scale=1.0):
    hidden = torch.randn(batch, seq_len, hidden_size, device=DEVICE).to(dtype)
    weight = (torch.randn(1, hidden_size, device=DEVICE) * logit_scale / hidden_size**0.5).to(dtype)
    bias = torch.randn(1, device=DEVICE).to(dtype)
    labels = torch.randint(0, 2, (batch, seq_len), device=DEVICE)
    mask = torch.randint(0, 2, (batch, seq_len), device=DEVICE)
    mask[0] = 0  # a sequence with no real token
    mask[-1] = 1  # and one with no padding
    return hidden, weight, bias, labels, mask


def loss_and_grads(fn, hidden, weight, bias, labels, mask, dtype=None):
    """fn's loss and d(hidden, weight, bias), on leaf copies converted to `dtype` (default: as given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (hidden, weight, bias)]
    loss = fn(*leaves, labels, mask)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [64, 100, 256, 768, 1024])
@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "no_mask"])
def test_matches_hf(dtype, hidden_size, use_mask):
    hidden, weight, bias, labels, mask = make_inputs(3, 37, hidden_size, dtype)
    mask = mask if use_mask else None
    ours = loss_and_grads(rtd_loss, hidden, weight, bias, labels, mask)
    plain = loss_and_grads(hf_rtd_loss, hidden, weight, bias, labels, mask)
    exact = loss_and_grads(hf_rtd_loss, hidden, weight, bias, labels, mask, dtype=torch.float64)
    for name, a, b, c in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, plain, exact):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)
        assert_accurate(name, a, b, c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stable_for_huge_logits(dtype):
    hidden, weight, bias, labels, mask = make_inputs(2, 16, 64, dtype, logit_scale=2000.0)
    ours = loss_and_grads(rtd_loss, hidden, weight, bias, labels, mask)
    exact = loss_and_grads(hf_rtd_loss, hidden, weight, bias, labels, mask, dtype=torch.float64)
    assert exact[0] > 100  # |logit| well above 100 for many tokens
    for name, a, c in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, exact):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), c.double(), rtol=1e-2, atol=1e-2 * c.abs().max().item(), msg=name)


def test_no_active_token_gives_zero_loss_and_grads():
    hidden, weight, bias, labels, mask = make_inputs(2, 9, 64, torch.float32)
    loss, *grads = loss_and_grads(rtd_loss, hidden, weight, bias, labels, torch.zeros_like(mask))
    assert loss.item() == 0.0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.bool, torch.float32])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float16])
def test_label_and_mask_dtypes(label_dtype, mask_dtype):
    hidden, weight, bias, labels, mask = make_inputs(2, 13, 64, torch.float32)
    expected = loss_and_grads(hf_rtd_loss, hidden, weight, bias, labels, mask)
    ours = loss_and_grads(rtd_loss, hidden, weight, bias, labels.to(label_dtype), mask.to(mask_dtype))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mask_values_other_than_one_are_inactive():
    # HF keeps exactly the tokens with attention_mask == 1.
    hidden, weight, bias, labels, mask = make_inputs(2, 11, 64, torch.float32)
    mask[:, ::3] = 2
    expected = hf_rtd_loss(hidden, weight, bias, labels, mask)
    torch.testing.assert_close(rtd_loss(hidden, weight, bias, labels, mask), expected)


def test_non_contiguous_hidden_labels_and_mask():
    hidden, weight, bias, labels, mask = make_inputs(2, 13, 128, torch.float32)
    seq_major = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # (B, L, H) with L-major storage
    every_other = torch.randn(2, 13, 256, device=DEVICE)[..., ::2]  # unit stride lost along H
    labels_t, mask_t = labels.t().contiguous().t(), mask.t().contiguous().t()
    for strided in (seq_major, every_other):
        assert not strided.is_contiguous()
        ours = loss_and_grads(rtd_loss, strided, weight, bias, labels_t, mask_t)
        expected = loss_and_grads(hf_rtd_loss, strided.contiguous(), weight, bias, labels, mask)
        for a, b in zip(ours, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(29, 64), (2, 3, 5, 64)], ids=["tokens_only", "four_dims"])
def test_any_leading_dims(shape):
    hidden = torch.randn(shape, device=DEVICE)
    weight, bias = torch.randn(1, 64, device=DEVICE) / 8, torch.randn(1, device=DEVICE)
    labels = torch.randint(0, 2, shape[:-1], device=DEVICE)
    mask = torch.randint(0, 2, shape[:-1], device=DEVICE)
    ours = loss_and_grads(rtd_loss, hidden, weight, bias, labels, mask)
    expected = loss_and_grads(rtd_loss_reference, hidden, weight, bias, labels, mask)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_return_logits_and_their_gradient():
    hidden, weight, bias, labels, mask = make_inputs(2, 11, 64, torch.float32)

    def loss_plus_logits(fn, *args):
        loss, logits = fn(*args, return_logits=True)
        assert logits.shape == labels.shape
        return loss + (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum()

    ours = loss_and_grads(lambda *a: loss_plus_logits(rtd_loss, *a), hidden, weight, bias, labels, mask)
    expected = loss_and_grads(lambda *a: loss_plus_logits(rtd_loss_reference, *a), hidden, weight, bias, labels, mask)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_without_bias_and_with_frozen_weight():
    hidden, weight, _, labels, mask = make_inputs(2, 11, 64, torch.float32)
    hidden.requires_grad_()
    loss = rtd_loss(hidden, weight, None, labels, mask)
    loss.backward()
    expected_hidden = hidden.detach().clone().requires_grad_()
    rtd_loss_reference(expected_hidden, weight, None, labels, mask).backward()
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, rtol=1e-5, atol=1e-7)


def test_gradient_is_scaled_by_the_incoming_gradient():
    hidden, weight, bias, labels, mask = make_inputs(2, 11, 64, torch.float32)
    once = loss_and_grads(rtd_loss, hidden, weight, bias, labels, mask)
    scaled = loss_and_grads(lambda *a: 50.0 * rtd_loss(*a), hidden, weight, bias, labels, mask)
    for a, b in zip(once[1:], scaled[1:]):
        torch.testing.assert_close(50.0 * a, b, rtol=1e-5, atol=1e-6)


def test_deterministic():
    inputs = make_inputs(4, 50, 256, torch.float32)
    first, second = (loss_and_grads(rtd_loss, *inputs) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_logits_written_without_grad():
    hidden, weight, bias, labels, mask = make_inputs(2, 11, 64, torch.float32)
    with torch.no_grad():
        loss = rtd_loss(hidden, weight, bias, labels, mask)
    torch.testing.assert_close(loss, hf_rtd_loss(hidden, weight, bias, labels, mask))


def test_reference_mode_matches_and_is_announced(caplog):
    hidden, weight, bias, labels, mask = make_inputs(2, 11, 64, torch.float32)
    kernel_loss = rtd_loss(hidden, weight, bias, labels, mask)
    _dispatch._announced.clear()  # announced once per process: earlier tests may have used reference mode
    set_kernel_mode("reference")
    try:
        with caplog.at_level(logging.INFO, logger="electra_triton"):
            reference_loss = rtd_loss(hidden, weight, bias, labels, mask)
    finally:
        set_kernel_mode("auto")
    torch.testing.assert_close(kernel_loss, reference_loss)
    assert any("reference" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="kernel mode"):
        set_kernel_mode("fastest")


def test_fake_and_autograd_registration():
    hidden, weight, bias, labels, mask = make_inputs(2, 5, 64, torch.float32)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, mask, True, False)
    torch.library.opcheck(torch.ops.electra_triton.rtd_loss_forward.default, args)


def _bad_inputs():
    hidden, weight, bias, labels, mask = make_inputs(2, 7, 64, torch.float32)
    return {
        "labels shape": ((hidden, weight, bias, labels[:, :-1], mask), ValueError, "labels"),
        "weight shape": ((hidden, weight.view(-1), bias, labels, mask), ValueError, "weight"),
        "weight width": ((hidden, weight[:, :-1], bias, labels, mask), ValueError, "weight"),
        "bias shape": ((hidden, weight, bias.expand(2), labels, mask), ValueError, "bias"),
        "mask shape": ((hidden, weight, bias, labels, mask[:1]), ValueError, "attention_mask"),
        "mask device": ((hidden, weight, bias, labels, mask.to("meta")), ValueError, "attention_mask"),
        "labels device": ((hidden, weight, bias, labels.to("meta"), mask), ValueError, "labels"),
        "integer hidden": ((hidden.long(), weight, bias, labels, mask), TypeError, "hidden"),
        "dtype mix": ((hidden, weight.double(), bias, labels, mask), TypeError, "weight"),
        "hidden not a tensor": ((hidden.tolist(), weight, bias, labels, mask), TypeError, "hidden"),
        "one-dim hidden": ((hidden[0, 0], weight, bias, labels[0, 0], mask), ValueError, "hidden"),
        "complex labels": ((hidden, weight, bias, labels.to(torch.complex64), mask), TypeError, "labels"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_naming_the_argument(case):
    args, error, argument = _bad_inputs()[case]
    with pytest.raises(error, match=argument):
        rtd_loss(*args)
