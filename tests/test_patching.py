"""electra_triton.patch: patched vs unpatched transformers models with identical weights, every head class."""

import copy
import importlib
import warnings

import pytest
import torch
import transformers
from conftest import DEVICE, gpu_only_bf16, requires_cuda
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForMultipleChoice,
    ElectraForPreTraining,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraForTokenClassification,
    ElectraModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

import electra_triton
from electra_triton import fused_modules

VOCAB, BATCH, SEQLEN = 64, 2, 8


def _config(cls=ElectraConfig, **overrides):
    sizes = {
        "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 40, "num_labels": 3,
    }
    if cls is ElectraConfig:
        sizes["embedding_size"] = 32
    return cls(**{**sizes, **overrides})


def _pair(model_cls, config=None, dtype=torch.float32, **flags):
    torch.manual_seed(0)
    reference = model_cls(config or _config()).to(DEVICE, dtype).eval()
    patched = electra_triton.patch(copy.deepcopy(reference), **flags)
    return reference, patched


def _batch(model_cls, padding="right"):
    ids = torch.randint(3, VOCAB, (BATCH, SEQLEN), device=DEVICE)
    mask = torch.ones(BATCH, SEQLEN, dtype=torch.long, device=DEVICE)
    if padding == "right":
        mask[1, 5:] = 0
    elif padding == "left":
        mask[1, :3] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    real = mask.bool()
    if model_cls in (ElectraForPreTraining,):
        inputs["labels"] = torch.randint(0, 2, (BATCH, SEQLEN), device=DEVICE)
    elif model_cls in (ElectraForMaskedLM, BertForMaskedLM, RobertaForMaskedLM):
        labels = torch.where(torch.rand(BATCH, SEQLEN, device=DEVICE) < 0.5, ids, -100)
        labels[0, 0] = ids[0, 0]
        inputs["labels"] = labels.masked_fill(~real, -100)
    elif model_cls is ElectraForTokenClassification:
        inputs["labels"] = torch.randint(0, 3, (BATCH, SEQLEN), device=DEVICE).masked_fill(~real, -100)
    elif model_cls in (ElectraForSequenceClassification, RobertaForSequenceClassification):
        inputs["labels"] = torch.randint(0, 3, (BATCH,), device=DEVICE)
    elif model_cls is ElectraForQuestionAnswering:
        inputs["start_positions"] = torch.tensor([1, 2], device=DEVICE)
        inputs["end_positions"] = torch.tensor([3, 4], device=DEVICE)
    elif model_cls is ElectraForMultipleChoice:
        inputs = {k: v[:, None].expand(BATCH, 2, SEQLEN).contiguous() for k, v in inputs.items()}
        # Distinct choices: identical ones would give gradients that cancel exactly.
        inputs["input_ids"] = torch.randint(3, VOCAB, (BATCH, 2, SEQLEN), device=DEVICE)
        inputs["labels"] = torch.tensor([0, 1], device=DEVICE)
        real = real[:, None].expand(BATCH, 2, SEQLEN).reshape(-1, SEQLEN)
    return inputs, real


def _rel(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-6)).item()


def _run(model, inputs, real):
    out = model(**inputs, output_hidden_states=True)
    if out.get("loss") is not None:
        loss = out.loss
    else:  # a fixed projection of the real positions: a loss whose gradients do not cancel through LayerNorm
        hidden = out[0][real].float()
        loss = (hidden * torch.linspace(-1, 1, hidden.numel(), device=DEVICE).view(hidden.shape)).sum()
    loss.backward()
    return out, loss


def _assert_parity(reference, patched, inputs, real, value_tol=1e-4, grad_tol=2e-3, all_positions=False):
    ref_out, ref_loss = _run(reference, inputs, real)
    out, loss = _run(patched, inputs, real)
    rows = slice(None) if all_positions else real
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref_out.hidden_states)):
        assert _rel(ours[rows], theirs[rows]) <= value_tol, f"hidden state {i}"
    for key in ("logits", "start_logits", "end_logits"):
        if out.get(key) is not None:
            ours, theirs = out[key], ref_out[key]
            if ours.shape[:2] == real.shape and not all_positions:
                ours, theirs = ours[real], theirs[real]
            assert _rel(ours, theirs) <= value_tol, key
    assert _rel(loss, ref_loss) <= value_tol, "loss"
    params = dict(patched.named_parameters())
    grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    # Relative to the gradient's own size, or to 1 % of the largest gradient for ones that cancel to ~0 by
    # construction (a bias behind a softmax, embedding rows): there only rounding noise is left to compare.
    floor = 1e-2 * max(g.abs().max().item() for g in grads.values())
    for name, theirs in grads.items():
        error = (params[name].grad.double() - theirs.double()).abs().max().item()
        assert error <= grad_tol * max(theirs.abs().max().item(), floor), f"grad of {name}"


HEADS = [
    ElectraModel, ElectraForPreTraining, ElectraForMaskedLM, ElectraForSequenceClassification,
    ElectraForTokenClassification, ElectraForQuestionAnswering, ElectraForMultipleChoice,
]


@pytest.mark.parametrize("model_cls", HEADS, ids=lambda c: c.__name__)
def test_every_electra_head_matches_transformers_fp32(model_cls):
    config = _config(num_labels=2) if model_cls is ElectraForQuestionAnswering else None
    reference, patched = _pair(model_cls, config)
    assert fused_modules(patched)
    # QA's loss softmaxes over padding positions too, and multiple choice reads the last (padding) token: values
    # only the padded path keeps as HF's (test_padding covers it); these two run unpadded batches here.
    padding = "none" if model_cls in (ElectraForQuestionAnswering, ElectraForMultipleChoice) else "right"
    _assert_parity(reference, patched, *_batch(model_cls, padding))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("attention", [True, "padded"])
def test_padding(padding, attention):
    model_cls = ElectraForPreTraining if padding == "left" else ElectraForTokenClassification
    reference, patched = _pair(model_cls, attention=attention)
    _assert_parity(reference, patched, *_batch(model_cls, padding), all_positions=attention == "padded")


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_hidden_activations(hidden_act):
    reference, patched = _pair(ElectraForPreTraining, _config(hidden_act=hidden_act))
    assert any("gelu_linear" in fused for fused in fused_modules(patched).values())
    _assert_parity(reference, patched, *_batch(ElectraForPreTraining))


@pytest.mark.parametrize("model_cls, config_cls", [
    (BertModel, BertConfig), (BertForMaskedLM, BertConfig), (RobertaForMaskedLM, RobertaConfig),
    (RobertaForSequenceClassification, RobertaConfig),
], ids=lambda c: c.__name__)
def test_bert_and_roberta(model_cls, config_cls):
    config = _config(config_cls, pad_token_id=1) if config_cls is RobertaConfig else _config(config_cls)
    reference, patched = _pair(model_cls, config)
    assert fused_modules(patched)
    _assert_parity(reference, patched, *_batch(model_cls))


@pytest.mark.parametrize("model_cls", [ElectraForPreTraining, ElectraForMaskedLM], ids=lambda c: c.__name__)
def test_fp16_accuracy_rule(model_cls):
    # Ours in fp16 may be off float64 by at most 2x what transformers' own fp16 computation is, plus slack.
    exact, _ = _pair(model_cls, dtype=torch.float64)
    reference, patched = _pair(model_cls, dtype=torch.float16)
    inputs, real = _batch(model_cls)
    exact_out = exact(**inputs)
    ref_out, out = reference(**inputs), patched(**inputs)
    for key in ("logits", "loss"):
        ours, plain, truth = out[key].double(), ref_out[key].double(), exact_out[key]
        if ours.dim() >= 2:
            ours, plain, truth = ours[real], plain[real], truth[real]
        bound = 2 * (plain - truth).abs().max() + 2e-3 * truth.abs().max().clamp_min(1)
        assert (ours - truth).abs().max() <= bound, key


def test_state_dict_print_idempotence_and_unpatch():
    reference, patched = _pair(ElectraForPreTraining)
    ref_state, state = reference.state_dict(), patched.state_dict()
    assert list(state) == list(ref_state)
    assert all(state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in ref_state.items())
    fused = fused_modules(patched)
    assert "electra_triton:" in repr(patched)
    assert electra_triton.patch(patched) is patched and fused_modules(patched) == fused
    inputs, _ = _batch(ElectraForPreTraining)
    electra_triton.unpatch(patched)
    assert not fused_modules(patched) and "electra_triton" not in repr(patched)
    assert all("forward" not in m.__dict__ for m in patched.modules())
    torch.testing.assert_close(patched(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)


def test_patch_touches_only_that_instance():
    other = ElectraForPreTraining(_config())
    _, patched = _pair(ElectraForPreTraining)
    assert fused_modules(patched) and not fused_modules(other)
    assert "forward" not in vars(transformers.ElectraForPreTraining) or \
        vars(transformers.ElectraForPreTraining)["forward"].__module__.startswith("transformers")


def test_bad_model_and_unsupported_configs():
    with pytest.raises(TypeError, match="Linear"):
        electra_triton.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="str"):
        electra_triton.unpatch("model")
    # Head dim 16: attention stays on transformers' path, with one warning; the numbers stay right.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference, patched = _pair(ElectraForPreTraining, _config(num_attention_heads=4))
    messages = [str(w.message) for w in caught if "electra_triton" in str(w.message)]
    assert len(messages) == 1 and "head dim 16" in messages[0]
    assert not any(f.get("attention") for f in fused_modules(patched).values())
    _assert_parity(reference, patched, *_batch(ElectraForPreTraining))
    with pytest.warns(UserWarning, match="position_embedding_type"):
        _pair(ElectraModel, _config(position_embedding_type="relative_key"))
    with pytest.warns(UserWarning, match="decoder"):
        _pair(ElectraModel, _config(is_decoder=True))


def test_apply_to_transformers_and_revert():
    electra_triton.apply_to_transformers(rtd_loss=False)
    try:
        model = ElectraForPreTraining(_config())
        fused = fused_modules(model)
        assert fused and "" not in fused  # the RTD loss was left off
    finally:
        electra_triton.revert_transformers()
    assert not fused_modules(ElectraForPreTraining(_config()))


def test_dropout_train_mode_reproducible_and_checkpointing():
    config = _config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_hidden_layers=1)
    _, patched = _pair(ElectraForPreTraining, config)
    patched.train()
    inputs, _ = _batch(ElectraForPreTraining)

    def step(seed):
        patched.zero_grad()
        torch.manual_seed(seed)
        out = patched(**inputs)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in patched.parameters()]

    first, grads = step(1)
    again, grads_again = step(1)
    other, _ = step(2)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    patched.gradient_checkpointing_enable()
    checkpointed, grads_checkpointed = step(1)
    torch.testing.assert_close(checkpointed, first)
    for ours, theirs in zip(grads_checkpointed, grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    patched.eval()
    torch.testing.assert_close(patched(**inputs).logits, patched(**inputs).logits, rtol=0, atol=0)


def test_autocast_keeps_fp32_master_weights():
    reference, patched = _pair(ElectraForMaskedLM)
    inputs, real = _batch(ElectraForMaskedLM)
    with torch.autocast(DEVICE, dtype=torch.float16 if DEVICE == "cpu" else torch.bfloat16):
        out, ref_out = patched(**inputs), reference(**inputs)
    out.loss.backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in patched.parameters())
    assert abs(out.loss.item() - ref_out.loss.item()) <= 2e-2 * abs(ref_out.loss.item())


def test_masked_lm_skips_logits_when_training():
    _, patched = _pair(ElectraForMaskedLM, _config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    inputs, _ = _batch(ElectraForMaskedLM)
    patched.train()
    assert patched(**inputs).logits is None
    assert patched(**inputs, skip_logits=False).logits.shape == (BATCH, SEQLEN, VOCAB)
    patched.eval()
    assert patched(**inputs).logits is not None and patched(**inputs, skip_logits=True).logits is None


def test_checkpoints_load_both_ways(tmp_path):
    reference, patched = _pair(ElectraForPreTraining)
    inputs, _ = _batch(ElectraForPreTraining)
    patched.save_pretrained(tmp_path / "patched")
    plain = ElectraForPreTraining.from_pretrained(tmp_path / "patched").to(DEVICE).eval()
    torch.testing.assert_close(plain(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)
    reference.save_pretrained(tmp_path / "plain")
    loaded = electra_triton.patch(ElectraForPreTraining.from_pretrained(tmp_path / "plain").to(DEVICE).eval())
    torch.testing.assert_close(loaded(**inputs).logits, patched(**inputs).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_convergence_matches_transformers():
    """Liger-style: a tiny generator + discriminator trained the ELECTRA way, patched vs not, from the same seed.

    (The fused MLM loss skips the generator's logits in training, so the replaced tokens are drawn without them.)"""
    def train(patch):
        torch.manual_seed(0)
        no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        generator = ElectraForMaskedLM(_config(hidden_size=32, intermediate_size=64, num_attention_heads=1,
                                               num_hidden_layers=1, **no_dropout)).to(DEVICE)
        discriminator = ElectraForPreTraining(_config(num_hidden_layers=1, **no_dropout)).to(DEVICE)
        if patch:
            electra_triton.patch(generator)
            electra_triton.patch(discriminator)
        params = [*generator.parameters(), *discriminator.parameters()]
        optimizer = torch.optim.AdamW(params, lr=3e-3)
        losses = []
        for _ in range(30):
            ids = torch.randint(3, VOCAB, (2, 8), device=DEVICE)
            mask = torch.ones_like(ids)
            mask[1, 6:] = 0
            masked = (torch.rand(ids.shape, device=DEVICE) < 0.25) & mask.bool()
            masked[:, 1] = True
            gen = generator(ids.masked_fill(masked, 2), attention_mask=mask, labels=ids.masked_fill(~masked, -100))
            # Replacements drawn independently of the generator: an argmax would turn rounding into token flips.
            sampled = torch.where(masked & (torch.rand(ids.shape, device=DEVICE) < 0.5), ids.roll(1, dims=1), ids)
            disc = discriminator(sampled, attention_mask=mask, labels=(sampled != ids).long())
            loss = gen.loss + 50 * disc.loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append((gen.loss.item(), disc.loss.item()))
        return torch.tensor(losses), torch.cat([p.detach().flatten() for p in params])

    ref_losses, ref_weights = train(False)
    losses, weights = train(True)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-3, atol=1e-4)
    # Adam turns rounding noise in near-zero gradients into full-size steps: an absolute bound for those.
    torch.testing.assert_close(weights, ref_weights, rtol=1e-2, atol=5e-3)


def test_fake_impls_of_wired_ops():
    mlm = importlib.import_module("electra_triton.ops.mlm_loss")
    rtd = importlib.import_module("electra_triton.ops.rtd_loss")

    hidden, labels = torch.randn(2, 5, 8), torch.randint(0, 2, (2, 5))
    w, b = torch.randn(1, 8, requires_grad=True), torch.randn(1, requires_grad=True)
    torch.library.opcheck(rtd._forward, (hidden, w, b, labels, None, True, True), test_utils=("test_faketensor",))
    weight, targets = torch.randn(11, 8), torch.randint(0, 11, (10,))
    torch.library.opcheck(mlm._forward, (hidden.view(10, 8), weight, None, targets, -100, False),
                          test_utils=("test_faketensor",))
    attn = importlib.import_module("electra_triton.ops.attention")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.empty(1, 2, 5, 32)
        result = attn.attention(fake, fake, fake, torch.ones(1, 5, dtype=torch.bool), 0.0, None)
    assert result.shape == (1, 2, 5, 32)


@pytest.mark.parametrize("model_cls", [ElectraForPreTraining, ElectraForMaskedLM], ids=lambda c: c.__name__)
def test_traces_fullgraph_in_training(model_cls):
    # Dynamo's graph capture alone (eager backend) runs anywhere: any graph break, e.g. reading the dropout seed
    # or logging in traced code, fails here. Training mode, so every dropout draws its seed.
    _, patched = _pair(model_cls)
    inputs, _ = _batch(model_cls)
    compiled = torch.compile(patched.train(), fullgraph=True, backend="eager")
    out = compiled(**inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@requires_cuda
@pytest.mark.parametrize("model_cls", [ElectraForPreTraining, ElectraForMaskedLM], ids=lambda c: c.__name__)
def test_compiles_fullgraph_on_gpu(model_cls):
    reference, patched = _pair(model_cls, dtype=torch.bfloat16, attention="padded")
    inputs, real = _batch(model_cls)
    compiled = torch.compile(patched, fullgraph=True)
    out, ref_out = compiled(**inputs), reference(**inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref_out.loss.item()) < 5e-2 * abs(ref_out.loss.item())


@requires_cuda
@pytest.mark.parametrize("model_cls", HEADS, ids=lambda c: c.__name__)
def test_bf16_accuracy_rule_on_gpu(model_cls):
    config = _config(num_labels=2) if model_cls is ElectraForQuestionAnswering else None
    exact, _ = _pair(model_cls, config, dtype=torch.float64)
    reference, patched = _pair(model_cls, config, dtype=torch.bfloat16)
    inputs, real = _batch(model_cls, "none" if model_cls in (ElectraForQuestionAnswering, ElectraForMultipleChoice)
                          else "right")
    exact_out, ref_out, out = exact(**inputs), reference(**inputs), patched(**inputs)
    for key in ("loss", "logits", "start_logits", "last_hidden_state"):
        if out.get(key) is None:
            continue
        ours, plain, truth = out[key].double(), ref_out[key].double(), exact_out[key].double()
        if ours.dim() >= 2 and ours.shape[:2] == real.shape:
            ours, plain, truth = ours[real], plain[real], truth[real]
        bound = 2 * (plain - truth).abs().max() + 1e-2 * truth.abs().max().clamp_min(1)
        assert (ours - truth).abs().max() <= bound, key


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="float16"), gpu_only_bf16])
def test_autocast_residual_stream_accuracy_rule(dtype):
    # The patched residual stream stays 16-bit under autocast (transformers': fp32). Against a float64 model, its
    # hidden states and every parameter gradient may be off by at most 2x what transformers' own autocast run is,
    # plus slack.
    config = _config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    exact, _ = _pair(ElectraForPreTraining, config, dtype=torch.float64)
    reference, patched = _pair(ElectraForPreTraining, config)
    inputs, real = _batch(ElectraForPreTraining)
    exact_out, _ = _run(exact, inputs, real)
    with torch.autocast(DEVICE, dtype=dtype):
        ref_out, _ = _run(reference, inputs, real)
        out, _ = _run(patched, inputs, real)
    assert out.hidden_states[-1].dtype == dtype  # no fp32 activation between the layers

    def within_rule(ours, plain, truth, name):
        ours, plain, truth = ours.double(), plain.double(), truth.double()
        bound = 2 * (plain - truth).abs().max() + 2e-3 * truth.abs().max()
        assert (ours - truth).abs().max() <= bound, name

    for i, (ours, plain, truth) in enumerate(zip(out.hidden_states, ref_out.hidden_states, exact_out.hidden_states)):
        within_rule(ours[real], plain[real], truth[real], f"hidden state {i}")
    within_rule(out.logits[real], ref_out.logits[real], exact_out.logits[real], "logits")
    plain_grads = dict(reference.named_parameters())
    for name, param in exact.named_parameters():
        if param.grad is not None:
            within_rule(dict(patched.named_parameters())[name].grad, plain_grads[name].grad, param.grad, f"grad {name}")
