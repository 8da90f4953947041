"""mlm_loss: fused vocabulary projection + cross-entropy over the masked positions, against float64 references."""

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES
from electra_triton.kernels import mlm_loss as kernel

from electra_triton.ops import mlm_loss, mlm_loss_reference
from electra_triton.ops.mlm_loss import _forward


def _inputs(shape, hidden_size, vocab_size, dtype, has_bias=True, masked_fraction=0.4):
    hidden = torch.randn(*shape, hidden_size, device=DEVICE, dtype=dtype)
    weight = (torch.randn(vocab_size, hidden_size, device=DEVICE) / hidden_size**0.5).to(dtype)
    bias = (0.1 * torch.randn(vocab_size, device=DEVICE)).to(dtype) if has_bias else None
    labels = torch.randint(0, vocab_size, shape, device=DEVICE)
    labels[torch.rand(shape, device=DEVICE) > masked_fraction] = -100
    return hidden, weight, bias, labels


def _loss_and_grads(fn, hidden, weight, bias, labels, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w, b = leaves[0], leaves[1], leaves[2] if bias is not None else None
    loss = fn(h, w, b, labels)
    loss.backward()
    return loss, [t.grad for t in leaves]


def _plain(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]).float(), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_matches_reference(dtype, has_bias):
    hidden, weight, bias, labels = _inputs((2, 9), 24, 100, dtype, has_bias)
    loss, grads = _loss_and_grads(mlm_loss, hidden, weight, bias, labels)
    plain_loss, plain_grads = _loss_and_grads(_plain, hidden, weight, bias, labels)
    exact_loss, exact_grads = _loss_and_grads(_plain, hidden, weight, bias, labels, torch.float64)
    assert loss.dtype == torch.float32
    if dtype == torch.float32:
        assert_accurate("loss", loss, plain_loss, exact_loss)
    else:  # an fp32 loss from low-precision logits: the accuracy rule, applied by hand
        assert abs(loss.item() - exact_loss.item()) <= 2 * abs(plain_loss.item() - exact_loss.item()) + 1e-4
    for name, ours, plain, exact in zip(("d_hidden", "d_weight", "d_bias"), grads, plain_grads, exact_grads):
        assert ours.dtype == dtype
        assert_accurate(name, ours, plain, exact)


def test_several_chunks_and_vocab_blocks(monkeypatch):
    # A budget of 3 rows of fp32 logits, and a vocabulary spanning two 8K blocks with a ragged tail: both loops.
    vocab_size = 8192 + 37
    monkeypatch.setattr(kernel, "LOGITS_BUDGET_BYTES", 3 * vocab_size * 4)
    assert kernel.rows_per_chunk(11, vocab_size, 4) == 3
    hidden, weight, bias, labels = _inputs((11,), 8, vocab_size, torch.float32, masked_fraction=0.7)
    loss, grads = _loss_and_grads(mlm_loss, hidden, weight, bias, labels)
    exact_loss, exact_grads = _loss_and_grads(_plain, hidden, weight, bias, labels, torch.float64)
    assert_accurate("loss", loss, loss, exact_loss)
    for name, ours, exact in zip(("d_hidden", "d_weight", "d_bias"), grads, exact_grads):
        assert_accurate(name, ours, ours, exact)


def test_return_logits_and_upstream_gradient():
    hidden, weight, bias, labels = _inputs((3, 5), 16, 50, torch.float32)
    h = hidden.clone().requires_grad_()
    loss, logits = mlm_loss(h, weight, bias, labels, return_logits=True)
    torch.testing.assert_close(logits, F.linear(hidden, weight, bias))
    (3 * loss + logits.sum()).backward()
    h_ref = hidden.clone().requires_grad_()
    ref_loss, ref_logits = mlm_loss_reference(h_ref, weight, bias, labels, return_logits=True)
    (3 * ref_loss + ref_logits.sum()).backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


def test_custom_ignore_index_and_no_active_label():
    hidden, weight, bias, labels = _inputs((2, 4), 8, 20, torch.float32)
    labels = labels.masked_fill(labels == -100, 7 + 20)
    for ignore in (27,):
        loss = mlm_loss(hidden, weight, bias, labels, ignore_index=ignore)
        torch.testing.assert_close(loss, mlm_loss_reference(hidden, weight, bias, labels, ignore_index=ignore))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = mlm_loss(h, w, bias, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_bad_input():
    hidden, weight, bias, labels = _inputs((2, 4), 8, 20, torch.float32)
    with pytest.raises(ValueError, match="labels"):
        mlm_loss(hidden, weight, bias, labels.masked_fill(labels == -100, 20))
    with pytest.raises(TypeError, match="labels"):
        mlm_loss(hidden, weight, bias, labels.float())
    with pytest.raises(ValueError, match="weight"):
        mlm_loss(hidden, weight[:, :7], bias, labels)
    with pytest.raises(ValueError, match="bias"):
        mlm_loss(hidden, weight, bias[:5], labels)
    with pytest.raises(TypeError, match="weight"):
        mlm_loss(hidden, weight.half(), bias, labels)
    with pytest.raises(ValueError, match="labels"):
        mlm_loss(hidden, weight, bias, labels[:, :3])
    with pytest.raises(TypeError, match="ignore_index"):
        mlm_loss(hidden, weight, bias, labels, ignore_index=1.5)


def test_opcheck():
    hidden, weight, bias, labels = _inputs((6,), 8, 20, torch.float32, masked_fraction=0.8)
    labels[0] = 3
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, -100, True)
    torch.library.opcheck(_forward, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
