"""generator_head: the fused generator head (loss, gradients, Gumbel-max sample, argmax) against references, its
sampler against softmax(logits / T), its memory rule, and its bad-input contract."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES, HAS_CUDA, requires_cuda
from electra_triton.kernels import mlm_loss as kernel
from test_pretrain_data import MICRO_GENERATOR, MICRO_MODEL
from test_pretrain_model import CLS, MASK, PAD, SEP, _batch, _Tokenizer

import electra_triton
from electra_triton.ops import generator_head, generator_head_reference
from electra_triton.pretrain.model import ElectraPretrainer, build_models
from electra_triton.tracing import OpTrace

head_module = importlib.import_module("electra_triton.ops.generator_head")  # the package's name is the function

# The sampler test's draws per temperature: thousands on a GPU, fewer in the interpreter (one program per draw).
DRAWS = 4000 if HAS_CUDA else 500
SIGNIFICANCE = 1e-3


def _inputs(n_rows, hidden_size, vocab_size, dtype, has_bias=True, masked_fraction=0.7):
    hidden = torch.randn(n_rows, hidden_size, device=DEVICE, dtype=dtype)
    weight = (torch.randn(vocab_size, hidden_size, device=DEVICE) / hidden_size**0.5).to(dtype)
    bias = (0.1 * torch.randn(vocab_size, device=DEVICE)).to(dtype) if has_bias else None
    labels = torch.randint(0, vocab_size, (n_rows,), device=DEVICE)
    labels[torch.rand(n_rows, device=DEVICE) > masked_fraction] = -100
    return hidden, weight, bias, labels


def _leaves(hidden, weight, bias, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]


def _plain(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def _grads(leaves):
    return [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_loss_gradients_and_argmax_match_reference(dtype, has_bias):
    hidden, weight, bias, labels = _inputs(9, 24, 100, dtype, has_bias)
    leaves = _leaves(hidden, weight, bias)
    loss, sampled, argmax = generator_head(*leaves, labels)
    loss.backward()
    plain_leaves, exact_leaves = _leaves(hidden, weight, bias), _leaves(hidden, weight, bias, torch.float64)
    plain_loss, exact_loss = _plain(*plain_leaves, labels), _plain(*exact_leaves, labels)
    plain_loss.backward()
    exact_loss.backward()
    assert loss.dtype == torch.float32 and sampled.dtype == argmax.dtype == torch.int64
    if dtype == torch.float32:
        assert_accurate("loss", loss, plain_loss, exact_loss)
    else:  # an fp32 loss from low-precision logits: the accuracy rule, applied by hand
        assert abs(loss.item() - exact_loss.item()) <= 2 * abs(plain_loss.item() - exact_loss.item()) + 1e-4
    for name, ours, plain, exact in zip(("d_hidden", "d_weight", "d_bias"), _grads(leaves), _grads(plain_leaves),
                                        _grads(exact_leaves)):
        assert ours.dtype == dtype
        assert_accurate(name, ours, plain, exact)
    assert argmax.equal(F.linear(hidden, weight, bias).argmax(-1))  # the logits in the same dtype, as the kernel's
    assert ((sampled >= 0) & (sampled < 100)).all()


def test_upstream_gradient_scales_and_reference_agrees():
    hidden, weight, bias, labels = _inputs(6, 8, 30, torch.float32)
    leaves, ref_leaves = _leaves(hidden, weight, bias), _leaves(hidden, weight, bias)
    loss, _, argmax = generator_head(*leaves, labels)
    ref_loss, _, ref_argmax = generator_head_reference(*ref_leaves, labels)
    (3 * loss).backward()
    (3 * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss)
    assert argmax.equal(ref_argmax)
    for ours, ref in zip(_grads(leaves), _grads(ref_leaves)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_budget_chunks_and_gives_the_same_result(monkeypatch):
    hidden, weight, bias, labels = _inputs(7, 8, 40, torch.float32)

    def run():
        torch.manual_seed(5)
        leaves = _leaves(hidden, weight, bias)
        loss, sampled, argmax = generator_head(*leaves, labels, temperature=0.7)
        loss.backward()
        return loss, sampled, argmax, _grads(leaves)

    whole = run()
    monkeypatch.setattr(kernel, "LOGITS_BUDGET_BYTES", 2 * 40 * 4)  # two fp32 rows of logits
    assert kernel.rows_per_chunk(7, 40, 4) == 2
    launches, launch = [], kernel.head_rows
    monkeypatch.setattr(kernel, "head_rows",
                        lambda logits, *args: launches.append(logits.shape) or launch(logits, *args))
    chunked = run()
    assert launches == [(2, 40), (2, 40), (2, 40), (1, 40)]
    torch.testing.assert_close(chunked[0], whole[0])
    assert chunked[1].equal(whole[1]) and chunked[2].equal(whole[2])  # the noise is keyed by the row, not the chunk
    for ours, ref in zip(chunked[3], whole[3]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_ignored_rows_and_empty_batches_give_zero_loss_and_gradients():
    hidden, weight, bias, labels = _inputs(5, 8, 20, torch.float32)
    for rows, row_labels in ((5, torch.full_like(labels, -100)), (0, labels[:0])):
        leaves = _leaves(hidden[:rows], weight, bias)
        loss, sampled, argmax = generator_head(*leaves, row_labels)
        loss.backward()
        assert loss.item() == 0.0 and sampled.shape == argmax.shape == (rows,)
        assert all(grad is not None and not grad.any() for grad in _grads(leaves))
    # Ignored rows contribute nothing: the loss of the other rows alone, averaged over them alone.
    labels[:2] = -100
    labels[2:] = labels[2:].clamp_min(0)
    loss = generator_head(hidden, weight, bias, labels)[0]
    torch.testing.assert_close(loss, generator_head(hidden[2:], weight, bias, labels[2:])[0])


def test_reproducible_under_manual_seed():
    hidden, weight, bias, labels = _inputs(6, 8, 64, torch.float32)
    torch.manual_seed(3)
    first, second = generator_head(hidden, weight, bias, labels)[1], generator_head(hidden, weight, bias, labels)[1]
    torch.manual_seed(3)
    assert generator_head(hidden, weight, bias, labels)[1].equal(first)
    assert not second.equal(first)  # consecutive calls draw new noise
    # A generator of the caller's (evaluation's fixed masks and samples) replaces the default one.
    draws = [generator_head(hidden, weight, bias, labels, generator=torch.Generator(DEVICE).manual_seed(7))[1]
             for _ in range(2)]
    assert draws[0].equal(draws[1])


def _chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's test of counts against a categorical distribution: the chi-square survival function at the
    statistic, i.e. the regularised upper incomplete gamma Q(df / 2, statistic / 2)."""
    expected = probabilities * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), statistic / 2).item()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_softmax_over_temperature(temperature):
    # Every row has the same logits over V = 8, so each row's sample is one draw from softmax(logits / T).
    vocab_size, hidden_size = 8, 4
    hidden = torch.randn(1, hidden_size, device=DEVICE).expand(DRAWS, -1).contiguous()
    weight = torch.randn(vocab_size, hidden_size, device=DEVICE)
    bias = torch.linspace(-1.0, 1.0, vocab_size, device=DEVICE)
    logits = F.linear(hidden[:1], weight, bias)[0].double()
    torch.manual_seed(11)
    sampled = generator_head(hidden, weight, bias, torch.full((DRAWS,), -100, device=DEVICE), temperature)[1]
    counts = torch.bincount(sampled, minlength=vocab_size).double()
    assert _chi_square_p_value(counts.cpu(), torch.softmax(logits / temperature, 0).cpu()) > SIGNIFICANCE
    # The test has power: the same draws reject the distribution of another temperature.
    assert _chi_square_p_value(counts.cpu(), torch.softmax(logits / (3 * temperature), 0).cpu()) < SIGNIFICANCE


def test_temperature_towards_zero_is_the_argmax():
    hidden, weight, bias, labels = _inputs(8, 8, 50, torch.float32)
    _, sampled, argmax = generator_head(hidden, weight, bias, labels, temperature=1e-4)
    assert sampled.equal(argmax)


def test_keeps_leading_dims_and_follows_autocast():
    hidden, weight, bias, labels = _inputs(6, 8, 30, torch.float32)
    loss, sampled, argmax = generator_head(hidden.view(2, 3, 8), weight, bias, labels.view(2, 3))
    assert sampled.shape == argmax.shape == (2, 3)
    torch.testing.assert_close(loss, generator_head(hidden, weight, bias, labels)[0])
    # Under autocast the logits are computed in the autocast dtype, as F.linear would; fp32 parameters get fp32 grads.
    leaves = _leaves(hidden, weight, bias)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _, argmax = generator_head(*leaves, labels)
    loss.backward()
    cast = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    torch.testing.assert_close(loss, generator_head(*cast, labels)[0])
    assert argmax.equal(F.linear(*cast).argmax(-1))
    assert all(grad.dtype == torch.float32 for grad in _grads(leaves))


def test_no_host_sync_and_a_two_gemm_backward():
    hidden, weight, bias, labels = _inputs(6, 8, 20, torch.float32)
    leaves = _leaves(hidden, weight, bias)
    with OpTrace() as forward:
        loss = generator_head(*leaves, labels)[0]
    with OpTrace() as backward:
        loss.backward()
    assert forward.host_syncs == backward.host_syncs == 0
    assert forward.counts()["electra_triton::generator_head_forward"] == 1
    matmuls = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
    assert sum(n for name, n in backward.counts().items() if name in matmuls) == 2  # d_hidden, d_weight: no recompute
    assert not any(name.startswith("electra_triton::") for name in backward.counts())
    assert "aten::zeros" not in backward.counts()  # no zero gradients materialised for the non-loss outputs


def test_bad_input():
    hidden, weight, bias, labels = _inputs(4, 8, 20, torch.float32)
    labels[0] = 3
    for bad in (20, -1):
        with pytest.raises(ValueError, match="labels"):
            generator_head(hidden, weight, bias, labels.masked_fill(labels == -100, bad))
    with pytest.raises(ValueError, match="labels"):  # a custom ignore_index does not make -100 valid
        generator_head(hidden, weight, bias, labels, ignore_index=-1)
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            generator_head(hidden, weight, bias, labels, temperature)
    with pytest.raises(TypeError, match="temperature"):
        generator_head(hidden, weight, bias, labels, "1")
    with pytest.raises(TypeError, match="labels"):
        generator_head(hidden, weight, bias, labels.float())
    with pytest.raises(ValueError, match="labels"):
        generator_head(hidden, weight, bias, labels[:3])
    with pytest.raises(ValueError, match="weight"):
        generator_head(hidden, weight[:, :7], bias, labels)
    with pytest.raises(ValueError, match="bias"):
        generator_head(hidden, weight, bias[:5], labels)
    with pytest.raises(TypeError, match="weight"):
        generator_head(hidden, weight.half(), bias, labels)
    with pytest.raises(TypeError, match="ignore_index"):
        generator_head(hidden, weight, bias, labels, ignore_index=1.5)
    with pytest.raises(TypeError, match="generator"):
        generator_head(hidden, weight, bias, labels, generator=7)


def test_kernel_flags_a_bad_label_with_a_nan_loss_and_no_gradient():
    logits = torch.randn(3, 10, device=DEVICE)
    flag = torch.zeros(1, device=DEVICE, dtype=torch.int32)
    grad = logits.clone()
    losses, _, _ = kernel.head_rows(grad, torch.tensor([2, 10, -100], device=DEVICE), -100, 1.0, 0, 0, False, True,
                                    flag)
    assert flag.item() == 1 and losses[1].isnan() and losses[2] == 0 and not grad[1:].any()
    torch.testing.assert_close(losses[0], torch.logsumexp(logits[0], 0) - logits[0, 2])


@requires_cuda
@pytest.mark.gpu
def test_bad_labels_on_cuda_raise_without_a_sync():
    hidden, weight, bias, labels = _inputs(4, 8, 20, torch.float32)
    labels[0] = 20
    with pytest.raises(ValueError, match="labels"):
        generator_head(hidden, weight, bias, labels)  # raises here only if its kernel has already finished
        torch.cuda.synchronize()
        generator_head(hidden, weight, bias, labels.clamp(0, 19))
    torch.cuda.synchronize()
    head_module._raise_for_flagged_labels()  # the good call's flag: clear, and nothing left pending
    assert not head_module._pending_label_flags


def test_opcheck_and_fullgraph_trace():
    hidden, weight, bias, labels = _inputs(6, 8, 20, torch.float32)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, -100, 1.0,
            torch.tensor([1, 2]), True)
    torch.library.opcheck(head_module._forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    compiled = torch.compile(lambda *args: generator_head(*args, 0.5), fullgraph=True, backend="eager")
    loss, sampled, argmax = compiled(hidden, weight, bias, labels)
    loss.backward()
    assert argmax.equal(F.linear(hidden, weight, bias).argmax(-1)) and sampled.shape == (6,)
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_pretrainer_uses_the_fused_head_when_the_generator_is_patched():
    def run(fused: bool):
        torch.manual_seed(0)
        generator, discriminator = build_models(MICRO_MODEL, MICRO_GENERATOR, _Tokenizer())
        if fused:  # only the head: the rest of the generator stays on transformers' ops
            electra_triton.patch(generator, attention=False, gelu_linear=False, layer_norm=False, rtd_loss=False)
        model = ElectraPretrainer(generator, discriminator, [PAD, CLS, SEP, MASK], MASK, max_seq_len=32).to(DEVICE)
        ids, mask = (t.to(DEVICE) for t in _batch(4, 32))
        calls = []
        model.generator.generator_lm_head.register_forward_hook(lambda *_: calls.append(1))
        out = model(ids, mask, torch.zeros_like(ids))
        out["loss"].backward()
        return out, model.generator.generator_lm_head.bias.grad, calls

    fused, fused_bias_grad, fused_calls = run(True)
    reference, reference_bias_grad, reference_calls = run(False)
    assert not fused_calls and reference_calls  # the fused path never materialises logits through the module
    torch.testing.assert_close(fused["mlm_loss"], reference["mlm_loss"], rtol=1e-5, atol=1e-6)
    assert fused["mlm_correct"] == reference["mlm_correct"] and fused["mlm_count"] == reference["mlm_count"]
    # The bias gradient flows through the MLM loss alone (the discriminator never sees the generator's head).
    torch.testing.assert_close(fused_bias_grad, reference_bias_grad, rtol=1e-4, atol=1e-7)
    assert 0 < fused["replaced"] <= fused["mlm_count"]  # samples drawn, mostly differing from the originals
