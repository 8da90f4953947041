"""embeddings_layer_norm against float64 references (DESIGN.md's accuracy rule), values and the gradient of every
table, weight and bias; dropout checked through the debug mask; the patched transformers embeddings against theirs."""

import copy

import pytest
import torch
from accuracy import assert_accurate
from conftest import DEVICE, DTYPES, gpu_only_bf16
from transformers import BertConfig, BertModel, ElectraConfig, ElectraModel, RobertaConfig, RobertaModel

import electra_triton
from electra_triton import op_costs
from electra_triton.integration.embeddings import embeddings_forward
from electra_triton.ops import embeddings_layer_norm, embeddings_layer_norm_reference, embeddings_layer_norm_with_mask
from electra_triton.tracing import OpRecord, OpTrace, TensorMeta

EPS = 1e-12  # ELECTRA's layer_norm_eps
VOCAB, POSITIONS, TYPES = 30, 24, 2
PAD = 0


def _tables(n_cols, dtype, param_dtype=None):
    word, position, token_type = (torch.randn(rows, n_cols, device=DEVICE).to(dtype)
                                  for rows in (VOCAB, POSITIONS, TYPES))
    weight = (1 + 0.1 * torch.randn(n_cols, device=DEVICE)).to(param_dtype or dtype)
    bias = (0.1 * torch.randn(n_cols, device=DEVICE)).to(param_dtype or dtype)
    return [word, position, token_type, weight, bias]


def _ids(shape, with_types):
    input_ids = torch.randint(0, VOCAB, shape, device=DEVICE)
    input_ids.view(-1)[::4] = PAD  # padding tokens: their word row must get no gradient
    input_ids.view(-1)[1::5] = 7  # a repeated token: its gradient sums over occurrences
    seqlen = shape[-1]
    position_ids = torch.arange(seqlen, device=DEVICE)
    if len(shape) == 2:
        position_ids = position_ids[None]  # (1, L), broadcast over the batch as transformers' buffer
    token_type_ids = torch.randint(0, TYPES, shape, device=DEVICE) if with_types else None
    return input_ids, position_ids, token_type_ids


def _value_and_grads(fn, params, grad_out, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in params]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


def _check(ids, params, dropout_p, out_dtype=None):
    """The kernel (its own mask read back from the debug entry point, the same seed drawing it again) against the
    reference applying that mask, in the same dtype and in float64."""
    options = {"out_dtype": out_dtype, "word_padding_idx": PAD}
    torch.manual_seed(1234)
    _, keep = embeddings_layer_norm_with_mask(*ids, *params, EPS, dropout_p, **options)
    if dropout_p == 0:
        assert keep.all()
    fn = lambda *p: embeddings_layer_norm_with_mask(*ids, *p, EPS, dropout_p, **options)[0]
    ref = lambda *p: embeddings_layer_norm_reference(*ids, *p, EPS, dropout_p, **options, keep_mask=keep)
    exact_ref = lambda *p: embeddings_layer_norm_reference(*ids, *p, EPS, dropout_p, word_padding_idx=PAD,
                                                           out_dtype=torch.float64, keep_mask=keep)
    grad_out = torch.randn(keep.shape, device=DEVICE).to(out_dtype or params[0].dtype)
    torch.manual_seed(1234)
    ours, ours_grads = _value_and_grads(fn, params, grad_out)
    plain, plain_grads = _value_and_grads(ref, params, grad_out)
    exact, exact_grads = _value_and_grads(exact_ref, params, grad_out, torch.float64)
    assert ours.dtype == (out_dtype or params[0].dtype) and ours.shape == (*ids[0].shape, params[0].shape[1])
    assert_accurate("y", ours, plain, exact)
    for name, param, o, p, e in zip(("d_word", "d_position", "d_token_type", "d_weight", "d_bias"), params,
                                    ours_grads, plain_grads, exact_grads):
        assert o.dtype == param.dtype, f"{name}: dtype {o.dtype}"
        assert_accurate(name, o, p, e)
    assert (ours_grads[0][PAD] == 0).all()


CASES = {  # ids shape, embedding dim, token types given, dropout_p
    "BL-N40-types": ((2, 5), 40, True, 0.0),
    "BL-N37-dropout": ((3, 4), 37, False, 0.2),
    "flat-N100-types-dropout": ((11,), 100, True, 0.3),
    "N768-rows-loop-types-dropout": ((4, 10), 768, True, 0.1),  # several programs, several row blocks each
    "N3-dropout": ((2, 3), 3, False, 0.3),  # narrower than one Philox call's four columns
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case, dtype):
    shape, n_cols, with_types, dropout_p = case
    _check(_ids(shape, with_types), _tables(n_cols, dtype), dropout_p)


@pytest.mark.parametrize("out_dtype", [pytest.param(torch.float16, id="float16"), gpu_only_bf16])
@pytest.mark.parametrize("with_types", [False, True], ids=["no-types", "types"])
def test_fp32_tables_with_16bit_output(out_dtype, with_types):
    # The autocast layout: fp32 tables and LayerNorm parameters, the output written in the autocast dtype.
    _check(_ids((2, 6), with_types), _tables(24, torch.float32), 0.2, out_dtype=out_dtype)


def test_16bit_tables_with_fp32_layer_norm_parameters():
    _check(_ids((2, 6), True), _tables(20, torch.float16, param_dtype=torch.float32), 0.0)


def test_position_padding_index_and_int32_ids():
    params = [t.requires_grad_() for t in _tables(16, torch.float32)]
    input_ids, _, token_type_ids = _ids((2, 7), True)
    position_ids = torch.tensor([[1, 2, 3, 1, 1, 4, 5], [1, 2, 1, 1, 1, 1, 1]], device=DEVICE)  # RoBERTa-style
    out = embeddings_layer_norm(input_ids.int(), position_ids.int(), token_type_ids, *params, EPS,
                                word_padding_idx=-VOCAB, position_padding_idx=1)  # -VOCAB is row 0, as nn.Embedding
    ref = embeddings_layer_norm_reference(input_ids, position_ids, token_type_ids, *params, EPS, word_padding_idx=0,
                                          position_padding_idx=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, params[:2], grad_out)
    ref_grads = torch.autograd.grad(ref, params[:2], grad_out)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (grads[0][0] == 0).all() and (grads[1][1] == 0).all() and grads[1][2].abs().sum() > 0


def test_dropout_is_reproducible_fresh_per_call_and_at_rate():
    params = _tables(64, torch.float32)
    ids = _ids((4, 16), True)
    torch.manual_seed(7)
    first, keep = embeddings_layer_norm_with_mask(*ids, *params, EPS, 0.25)
    second = embeddings_layer_norm(*ids, *params, EPS, 0.25)
    torch.manual_seed(7)
    again = embeddings_layer_norm(*ids, *params, EPS, 0.25)
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert torch.equal(first == 0, ~keep)
    assert abs(keep.float().mean().item() - 0.75) < 0.03  # 4096 draws


def test_no_tokens_gives_an_empty_output_and_zero_gradients():
    params = [t.requires_grad_() for t in _tables(8, torch.float32)]
    ids = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    out = embeddings_layer_norm(ids, torch.arange(5, device=DEVICE)[None], None, *params, EPS, 0.1)
    assert out.shape == (0, 5, 8)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in params)


@pytest.mark.parametrize("change, error, name", [
    (lambda a: a.update(input_ids=a["input_ids"].float()), TypeError, "input_ids"),
    (lambda a: a.update(input_ids=a["input_ids"][None]), ValueError, "input_ids"),
    (lambda a: a.update(position_ids=torch.arange(5)[None, None]), ValueError, "position_ids"),
    (lambda a: a.update(position_ids=torch.zeros(3, 6, dtype=torch.long)), ValueError, "position_ids"),
    (lambda a: a.update(position_ids=a["position_ids"].to("meta")), ValueError, "position_ids"),
    (lambda a: a.update(token_type_ids=torch.zeros(2, 6, dtype=torch.bool)), TypeError, "token_type_ids"),
    (lambda a: a.update(word_weight=a["word_weight"].long()), TypeError, "word_weight"),
    (lambda a: a.update(word_weight=a["word_weight"][0]), ValueError, "word_weight"),
    (lambda a: a.update(word_weight=torch.zeros(4, 20000)), ValueError, "word_weight"),
    (lambda a: a.update(position_weight=a["position_weight"][:, :5]), ValueError, "position_weight"),
    (lambda a: a.update(position_weight=a["position_weight"].half()), TypeError, "position_weight"),
    (lambda a: a.update(token_type_weight=a["token_type_weight"][:0]), ValueError, "token_type_weight"),
    (lambda a: a.update(weight=a["weight"][:5]), ValueError, "weight"),
    (lambda a: a.update(bias=a["bias"].half()), TypeError, "bias"),
    (lambda a: a.update(eps=0.0), ValueError, "eps"),
    (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
    (lambda a: a.update(out_dtype=torch.int8), TypeError, "out_dtype"),
    (lambda a: a.update(word_padding_idx=VOCAB), ValueError, "word_padding_idx"),
    (lambda a: a.update(position_padding_idx="0"), TypeError, "position_padding_idx"),
])
def test_bad_input_raises_naming_the_argument(change, error, name):
    input_ids, position_ids, token_type_ids = _ids((2, 6), True)
    word, position, token_type, weight, bias = _tables(16, torch.float32)
    args = {"input_ids": input_ids, "position_ids": position_ids, "token_type_ids": token_type_ids,
            "word_weight": word, "position_weight": position, "token_type_weight": token_type, "weight": weight,
            "bias": bias, "eps": EPS, "dropout_p": 0.1}
    change(args)
    with pytest.raises(error, match=name):
        embeddings_layer_norm(**args)


def _record(name, outputs, **arguments):
    return OpRecord(name, None, [], outputs, False, False, False, (), arguments)


def test_declared_cost_reads_gathered_rows_and_writes_dense_gradients():
    tokens, width = 64, 32
    meta = lambda *shape, dtype=torch.float32: TensorMeta(shape, dtype, "cpu")
    ids = meta(2, tokens // 2, dtype=torch.int64)
    tables = {"word": meta(1000, width), "position": meta(512, width), "token_type": meta(2, width)}
    common = {"input_ids": ids, "position_ids": ids, "token_type_ids": None, **tables, "weight": meta(width),
              "rng": meta(2, dtype=torch.int64)}
    forward = op_costs.op_cost(_record("electra_triton::embeddings_layer_norm_forward",
                                       [meta(tokens, width, dtype=torch.bfloat16), meta(tokens), meta(tokens)],
                                       **common, bias=meta(width)))
    rows = 4 * width * (tokens + tokens + 2)  # a word and a position row per token, both token-type rows
    assert forward.kernels == 1 and rows < forward.bytes_read < tables["word"].nbytes
    assert forward.bytes_written == tokens * width * 2 + 2 * tokens * 4
    backward = op_costs.op_cost(_record("electra_triton::embeddings_layer_norm_backward",
                                        [tables["word"], tables["position"], meta(4, width)], **common,
                                        grad_y=meta(tokens, width, dtype=torch.bfloat16), mean=meta(tokens),
                                        rstd=meta(tokens)))
    assert backward.kernels == 5 and backward.bytes_written > tables["word"].nbytes + tables["position"].nbytes


# ------------------------------------------------------------------------------------------ transformers integration

MODELS = {
    "electra": (ElectraModel, ElectraConfig, {"embedding_size": 24}),
    "bert": (BertModel, BertConfig, {}),
    "roberta": (RobertaModel, RobertaConfig, {"pad_token_id": 1}),  # positions from the padding, padding_idx rows
}


def _model_pair(name, **overrides):
    model_cls, config_cls, extra = MODELS[name]
    config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=64, max_position_embeddings=POSITIONS, type_vocab_size=TYPES,
                        **{**extra, **overrides})
    torch.manual_seed(0)
    reference = model_cls(config).to(DEVICE).eval()
    return reference, electra_triton.patch(copy.deepcopy(reference))


def _embedding_inputs(name):
    input_ids = torch.randint(2, VOCAB, (2, 7), device=DEVICE)
    input_ids[1, 5:] = 1 if name == "roberta" else 0  # padding
    return [
        {"input_ids": input_ids},
        {"input_ids": input_ids, "token_type_ids": torch.randint(0, TYPES, (2, 7), device=DEVICE)},
        {"input_ids": input_ids, "position_ids": torch.randint(2, POSITIONS, (2, 7), device=DEVICE)},
        {"input_ids": input_ids[:, :4], "past": 3},  # cache_length (5.24) / past_key_values_length (5.17)
        {"inputs_embeds": torch.randn(2, 7, 24 if name == "electra" else 32, device=DEVICE)},  # HF's own forward
    ]


@pytest.mark.parametrize("name", MODELS)
def test_patched_embeddings_match_transformers(name):
    reference, patched = _model_pair(name)
    ours_module, theirs_module = patched.embeddings, reference.embeddings
    assert ours_module.forward.__func__ is embeddings_forward
    # The reference is what transformers computes, too.
    ids = _embedding_inputs(name)[1]
    positions = theirs_module.position_ids[:, :7] if name != "roberta" else \
        theirs_module.create_position_ids_from_input_ids(ids["input_ids"], 1)
    torch.testing.assert_close(embeddings_layer_norm_reference(
        ids["input_ids"], positions, ids["token_type_ids"], *(m.weight for m in (
            theirs_module.word_embeddings, theirs_module.position_embeddings, theirs_module.token_type_embeddings,
            theirs_module.LayerNorm)), theirs_module.LayerNorm.bias, theirs_module.LayerNorm.eps),
        theirs_module(**ids))
    for inputs in _embedding_inputs(name):
        past = inputs.pop("past", 0)
        outs = []
        for module in (ours_module, theirs_module):
            module.zero_grad()
            out = module(**inputs) if not past else module(*inputs.values(), None, None, None, past)
            (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum().backward()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for (param_name, ours), theirs in zip(ours_module.named_parameters(), theirs_module.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=param_name)


def test_training_mode_drops_out_reproducibly():
    _, patched = _model_pair("electra", hidden_dropout_prob=0.3)
    embeddings = patched.embeddings.train()
    ids = torch.randint(0, VOCAB, (4, 16), device=DEVICE)
    torch.manual_seed(3)
    first = embeddings(input_ids=ids)
    torch.manual_seed(3)
    assert torch.equal(first, embeddings(input_ids=ids))
    assert abs((first == 0).float().mean().item() - 0.3) < 0.05
    assert (embeddings.eval()(input_ids=ids) != 0).all()


def test_patched_model_matches_transformers_and_keeps_the_autocast_dtype_without_a_cast():
    reference, patched = _model_pair("electra")
    # Only what the layer_norm flag fuses: the embeddings and the residual LayerNorms.
    electra_triton.patch(patched, attention=False, gelu_linear=False, rtd_loss=False, mlm_loss=False)
    ids = torch.randint(1, VOCAB, (2, 9), device=DEVICE)
    outs = []
    for model in (patched, reference):
        out = model(input_ids=ids).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for (name, ours), theirs in zip(patched.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-3, atol=1e-4, msg=name)

    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    with torch.autocast(DEVICE, dtype=dtype), OpTrace() as trace:
        embedded = patched.embeddings(input_ids=ids)
        patched(input_ids=ids)
    assert embedded.dtype == dtype
    casts = [r for r in trace.records if r.name == "aten::_to_copy" and r.inputs[0].shape[:2] == ids.shape]
    assert not casts, "an activation is cast: the embeddings' output (or the encoder's cast of it)"


def test_opcheck_fake_and_autograd_registration():
    input_ids, position_ids, token_type_ids = _ids((2, 6), True)
    params = [t.requires_grad_() for t in _tables(16, torch.float32)]
    forward = torch.ops.electra_triton.embeddings_layer_norm_forward.default
    args = (input_ids, position_ids.expand(2, 6), token_type_ids, *params, 1e-5, 0.1, torch.tensor([3, 4]),
            torch.float16, 0, -1, False)
    torch.library.opcheck(forward, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y, mean, rstd, _ = forward(*args)
    backward = torch.ops.electra_triton.embeddings_layer_norm_backward.default
    torch.library.opcheck(backward, (torch.randn_like(y), *args[:6], params[3], mean, rstd, 0, -1, 0.1, args[10]),
                          test_utils=("test_schema", "test_faketensor"))
