"""Part (a): correctness on the device. Each op in each low-precision dtype against its float64 reference under
DESIGN.md's 2x rule (electra_triton.accuracy), values and every gradient; then patched ELECTRA models against stock
transformers under autocast; then torch.compile(fullgraph=True) of a patched model.

Every check returns rows `{op, case, tensor, ok, error, plain_error, bound, scale, dtype}`: `ok` is the rule's
verdict, `error` our max abs error against float64, `plain_error` PyTorch's own in the same dtype. Shapes are small
(a check costs compilation, not device time); on CPU (TOY) they shrink further so the interpreter stays cheap.
"""

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

import electra_triton
from electra_triton import ops
from electra_triton.accuracy import accuracy
from electra_triton.presets import PRESETS

from ..rtd_loss import hf_rtd_loss
from .context import Context

EPS = 1e-12  # ELECTRA's layer_norm_eps
DROPOUT = 0.1


def evaluate(fn: Callable[..., Any], inputs: Sequence[torch.Tensor | None], grad_out: torch.Tensor | None,
             dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """[fn(*leaves), d leaf for each tensor leaf]: leaves are fresh copies of `inputs` (cast to `dtype` if given) that
    require grad; a tuple output counts by its first element; a scalar output backpropagates 1."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(None if grad_out is None else grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves if leaf is not None]


def compare(op: str, case: str, names: Sequence[str], ours: Sequence[torch.Tensor], plain: Sequence[torch.Tensor],
            exact: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """One row per named tensor: the accuracy rule's verdict for ours vs plain vs exact."""
    return [{"op": op, "case": case, "tensor": name, **accuracy(o, p, e, dtype=dtype)}
            for name, o, p, e in zip(names, ours, plain, exact, strict=True)]


def _randn(ctx: Context, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=ctx.device) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------- the ops


def attention_rows(ctx: Context, dtype: torch.dtype) -> list[dict]:
    """Padded attention with a key mask (right padding and holes), with dropout through the kernel's keep-mask, and
    varlen on packed sequences; q, k, v as HF's (B, L, H, D) projections transposed to (B, H, L, D)."""
    batch, heads, seqlen, head_dim = (2, 2, 24, 32) if ctx.toy else (2, 4, 200, 64)
    leaves = [_randn(ctx, batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(3)]
    grad = torch.randn(batch, seqlen, heads, head_dim, device=ctx.device)
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=ctx.device)
    mask[0, seqlen * 2 // 3:] = False
    mask[1, 1::5] = False
    hf = lambda fn: lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    names = ("out", "dq", "dk", "dv")
    rows = compare(
        "attention", "mask", names, evaluate(hf(lambda q, k, v: ops.attention(q, k, v, mask)), leaves, grad),
        evaluate(hf(lambda q, k, v: ops.attention_reference(q, k, v, mask, upcast=False)), leaves, grad),
        evaluate(hf(lambda q, k, v: ops.attention_reference(q, k, v, mask)), leaves, grad, torch.float64))

    keep: list[torch.Tensor] = []

    def with_mask(q, k, v):  # the kernel's own keep-mask, for the references to apply; backward regenerates it
        out, kept = ops.attention_with_dropout_mask(q, k, v, mask, DROPOUT)
        keep.append(kept)
        return out

    ours = evaluate(hf(with_mask), leaves, grad)
    applied_p = ops.quantized_attention_dropout_p(DROPOUT)  # the kernel's 8-bit draws drop a multiple of 1/256
    reference = lambda upcast: hf(lambda q, k, v: ops.attention_reference(q, k, v, mask, applied_p,
                                                                          dropout_mask=keep[0], upcast=upcast))
    rows += compare("attention", f"mask dropout={DROPOUT} (kernel's mask)", names, ours,
                    evaluate(reference(False), leaves, grad), evaluate(reference(True), leaves, grad, torch.float64))

    lengths = [seqlen, seqlen // 3, 1, seqlen // 2 + 3]
    cu_seqlens = torch.tensor([0, *lengths], device=ctx.device).cumsum(0).to(torch.int32)
    packed = [_randn(ctx, sum(lengths), heads, head_dim, dtype=dtype) for _ in range(3)]
    grad = torch.randn(sum(lengths), heads, head_dim, device=ctx.device)
    varlen = lambda fn, **kw: lambda q, k, v: fn(q, k, v, cu_seqlens, max(lengths), **kw)
    rows += compare("attention", f"varlen lengths={lengths}", names,
                    evaluate(varlen(ops.attention_varlen), packed, grad),
                    evaluate(varlen(ops.attention_varlen_reference, upcast=False), packed, grad),
                    evaluate(varlen(ops.attention_varlen_reference), packed, grad, torch.float64))
    return rows


def gelu_linear_rows(ctx: Context, dtype: torch.dtype) -> list[dict]:
    rows_, K, N = (20, 40, 24) if ctx.toy else (300, 768, 3072)  # an FFN up-projection of ELECTRA-base
    inputs = [_randn(ctx, rows_, K, dtype=dtype), _randn(ctx, N, K, dtype=dtype, scale=K**-0.5),
              _randn(ctx, N, dtype=dtype, scale=0.1)]
    grad = torch.randn(rows_, N, device=ctx.device)
    return compare("gelu_linear", f"M={rows_} K={K} N={N}", ("y", "dx", "dweight", "dbias"),
                   evaluate(ops.gelu_linear, inputs, grad), evaluate(ops.gelu_linear_reference, inputs, grad),
                   evaluate(ops.gelu_linear_reference, inputs, grad, torch.float64))


def layer_norm_rows(ctx: Context, dtype: torch.dtype) -> list[dict]:
    """The blocks' +bias -> dropout -> +residual -> LayerNorm (the output projection's bias as x_bias, as the fused
    encoder layer calls it) with the kernel's own dropout mask."""
    n_rows, hidden = (8, 40) if ctx.toy else (300, 768)
    inputs = [_randn(ctx, n_rows, hidden, dtype=dtype), _randn(ctx, n_rows, hidden, dtype=dtype),
              (1 + 0.1 * torch.randn(hidden, device=ctx.device)).to(dtype), _randn(ctx, hidden, dtype=dtype, scale=0.1),
              _randn(ctx, hidden, dtype=dtype, scale=0.1)]
    grad = torch.randn(n_rows, hidden, device=ctx.device)
    keep: list[torch.Tensor] = []

    def with_mask(x, residual, weight, bias, x_bias):
        out, kept = ops.dropout_add_layer_norm_with_mask(x, residual, weight, bias, EPS, DROPOUT, x_bias=x_bias)
        keep.append(kept)
        return out

    ours = evaluate(with_mask, inputs, grad)
    reference = lambda x, residual, weight, bias, x_bias: ops.dropout_add_layer_norm_reference(
        x, residual, weight, bias, EPS, DROPOUT, keep[0], x_bias=x_bias)
    return compare("dropout_add_layer_norm", f"rows={n_rows} N={hidden} residual x_bias p={DROPOUT} (kernel's mask)",
                   ("y", "dx", "dresidual", "dweight", "dbias", "dx_bias"), ours, evaluate(reference, inputs, grad),
                   evaluate(reference, inputs, grad, torch.float64))


def rtd_loss_rows(ctx: Context, dtype: torch.dtype) -> list[dict]:
    batch, seqlen, hidden = (2, 9, 64) if ctx.toy else (4, 128, 768)
    inputs = [_randn(ctx, batch, seqlen, hidden, dtype=dtype), _randn(ctx, 1, hidden, dtype=dtype, scale=hidden**-0.5),
              _randn(ctx, 1, dtype=dtype)]
    labels = torch.randint(0, 2, (batch, seqlen), device=ctx.device)
    mask = torch.randint(0, 2, (batch, seqlen), device=ctx.device)
    mask[-1] = 1
    loss = lambda fn: lambda h, w, b: fn(h, w, b, labels, mask)
    return compare("rtd_loss", f"B={batch} L={seqlen} H={hidden} mask", ("loss", "dhidden", "dweight", "dbias"),
                   evaluate(loss(ops.rtd_loss), inputs, None), evaluate(loss(hf_rtd_loss), inputs, None),
                   evaluate(loss(hf_rtd_loss), inputs, None, torch.float64))


def _vocabulary_head_inputs(ctx: Context, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor, str]:
    """Masked rows of ELECTRA-base's generator (hidden 256) against its 30,522-token vocabulary; ~30 % labelled."""
    n_rows, hidden, vocab = (18, 24, 100) if ctx.toy else (512, 256, 30522)
    inputs = [_randn(ctx, n_rows, hidden, dtype=dtype), _randn(ctx, vocab, hidden, dtype=dtype, scale=hidden**-0.5),
              _randn(ctx, vocab, dtype=dtype, scale=0.1)]
    labels = torch.randint(0, vocab, (n_rows,), device=ctx.device)
    labels[torch.rand(n_rows, device=ctx.device) > 0.3] = -100
    labels[0] = 1
    return inputs, labels, f"rows={n_rows} E={hidden} V={vocab}"


def _vocabulary_head_rows(op: str, loss_of: Callable, inputs: list[torch.Tensor], labels: torch.Tensor, case: str,
                          dtype: torch.dtype) -> list[dict]:
    """The fp32 loss (held to the inputs' dtype's rule) and its three gradients against ElectraForMaskedLM's
    computation: logits in the input dtype, cross-entropy in fp32."""
    def plain(h, w, b):
        return F.cross_entropy(F.linear(h, w, b).float(), labels, ignore_index=-100)

    ours = evaluate(lambda h, w, b: loss_of(h, w, b, labels), inputs, None)
    same_dtype, exact = evaluate(plain, inputs, None), evaluate(plain, inputs, None, torch.float64)
    return (compare(op, case, ("loss",), ours[:1], same_dtype[:1], exact[:1], dtype=dtype)
            + compare(op, case, ("dhidden", "dweight", "dbias"), ours[1:], same_dtype[1:], exact[1:]))


def mlm_loss_rows(ctx: Context, dtype: torch.dtype) -> list[dict]:
    """The masked-LM loss (vocabulary projection + cross-entropy over the labelled rows only)."""
    inputs, labels, case = _vocabulary_head_inputs(ctx, dtype)
    return _vocabulary_head_rows("mlm_loss", ops.mlm_loss, inputs, labels, case, dtype)


ARGMAX_AGREEMENT = 0.99  # rows whose logits tie to within a rounding may pick either token


def generator_head_rows(ctx: Context, dtype: torch.dtype) -> list[dict]:
    """The fused generator head: loss and gradients as mlm_loss; its argmax against PyTorch's logits in the same
    dtype; its samples within the vocabulary (their distribution is tests/test_generator_head.py's chi-square)."""
    inputs, labels, case = _vocabulary_head_inputs(ctx, dtype)
    head = ops.generator_head
    rows = _vocabulary_head_rows("generator_head", lambda *args: head(*args)[0], inputs, labels, case, dtype)
    with torch.no_grad():
        _, sampled, argmax = head(*inputs, labels)
        agreement = (argmax == F.linear(*inputs).argmax(-1)).double().mean().item()
    in_range = bool(((sampled >= 0) & (sampled < inputs[1].shape[0])).all())
    rows.append({"op": "generator_head", "case": case, "tensor": "argmax and samples", "ok": agreement >=
                 ARGMAX_AGREEMENT and in_range, "agreement": agreement, "samples_in_vocabulary": in_range,
                 "error": 1 - agreement, "plain_error": None, "bound": 1 - ARGMAX_AGREEMENT,
                 "dtype": str(dtype).removeprefix("torch.")})
    return rows


OP_CHECKS: dict[str, Callable[[Context, torch.dtype], list[dict]]] = {
    "attention": attention_rows, "gelu_linear": gelu_linear_rows, "dropout_add_layer_norm": layer_norm_rows,
    "rtd_loss": rtd_loss_rows, "mlm_loss": mlm_loss_rows, "generator_head": generator_head_rows,
}


def op_correctness(op: str) -> Callable[[Context], list[dict]]:
    """The part checking one op in every dtype of the run."""
    def part(ctx: Context) -> list[dict]:
        torch.manual_seed(0)
        return [row for dtype in ctx.dtypes for row in OP_CHECKS[op](ctx, dtype)]
    return part


# -------------------------------------------------------------------------------------------------------- the models


def _model_config(role: str, ctx: Context, **overrides: Any) -> ElectraConfig:
    """The base preset's model (TOY: a micro one), dropout off so that the three runs compute the same function."""
    fields = {**PRESETS["base"][role]}
    if ctx.toy:
        fields.update(vocab_size=120, embedding_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=64)
    fields.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)
    return ElectraConfig(**fields, attn_implementation="sdpa")


def _model_batch(ctx: Context, config: ElectraConfig, role: str) -> dict[str, torch.Tensor]:
    batch, seqlen = (2, 16) if ctx.toy else (4, 256)
    ids = torch.randint(5, config.vocab_size, (batch, seqlen), device=ctx.device)
    mask = torch.ones_like(ids)
    mask[0, seqlen * 3 // 4:] = 0  # one padded sequence: the kernels' masking and HF's must agree
    if role == "discriminator":
        labels = torch.randint(0, 2, ids.shape, device=ctx.device)
    else:
        labels = torch.where(torch.rand(ids.shape, device=ctx.device) < 0.15, ids, -100).masked_fill(mask == 0, -100)
        labels[1, 0] = ids[1, 0]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _forward_backward(model: torch.nn.Module, inputs: dict, autocast: torch.dtype | None,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        out = model(**inputs)
    out.loss.backward()
    unwrapped = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes the parameter names
    grads = {name: p.grad for name, p in unwrapped.named_parameters() if p.grad is not None}
    logits = None if out.get("logits") is None else out.logits.detach()
    return out.loss.detach(), logits, grads


def model_rows(ctx: Context, role: str, model_cls: type, label: str, run_ours: Callable | None = None,
               **config_overrides: Any) -> list[dict]:
    """Patched model (or `run_ours(patched)`) vs stock under autocast vs stock in float64: loss, logits at real
    positions, and every parameter gradient (one summary row: how many pass, the worst)."""
    torch.manual_seed(0)
    config = _model_config(role, ctx, **config_overrides)
    stock = model_cls(config).to(ctx.device).train()
    patched = electra_triton.patch(copy.deepcopy(stock))
    exact = copy.deepcopy(stock).double()
    inputs = _model_batch(ctx, config, role)
    dtype = ctx.autocast_dtype
    ours = _forward_backward(run_ours(patched) if run_ours else patched, inputs, dtype, ctx.device)
    plain = _forward_backward(stock, inputs, dtype, ctx.device)
    truth = _forward_backward(exact, inputs, None, ctx.device)
    case = f"{label} B,L={tuple(inputs['input_ids'].shape)} autocast {str(dtype).removeprefix('torch.')}"
    rows = compare(label, case, ("loss",), ours[:1], plain[:1], truth[:1], dtype=dtype)
    if ours[1] is not None:  # the generator's patched forward skips the logits in training
        real = inputs["attention_mask"].bool()
        rows += compare(label, case, ("logits (real tokens)",), [ours[1][real]], [plain[1][real]], [truth[1][real]],
                        dtype=dtype)
    missing = sorted(set(truth[2]) - set(ours[2]))  # a parameter the patched forward no longer reaches
    verdicts = {name: accuracy(ours[2][name], plain[2][name], grad, dtype=dtype) for name, grad in truth[2].items()
                if name in ours[2]}
    failing = missing + sorted(name for name, v in verdicts.items() if not v["ok"])
    worst = max(verdicts, key=lambda name: verdicts[name]["error"] / max(verdicts[name]["bound"], 1e-30))
    rows.append({"op": label, "case": case, "tensor": f"grads of {len(verdicts)} parameters", "ok": not failing,
                 "failing": failing, "worst": worst, **{k: verdicts[worst][k] for k in ("error", "plain_error",
                                                                                         "bound", "scale", "dtype")}})
    return rows


def patched_models(ctx: Context) -> list[dict]:
    """ELECTRA-base discriminator (attention, GELU-linear, LayerNorm, RTD loss) and generator (MLM loss), patched."""
    size = "micro" if ctx.toy else "base"
    return (model_rows(ctx, "discriminator", ElectraForPreTraining, f"ElectraForPreTraining ({size})")
            + model_rows(ctx, "generator", ElectraForMaskedLM, f"ElectraForMaskedLM ({size} generator)"))


def compiled_model(ctx: Context) -> list[dict]:
    """torch.compile(fullgraph=True) of a patched two-layer base-sized discriminator: inductor on the GPU, dynamo with
    the eager backend on CPU (a C++ inductor build would cost minutes there)."""
    compile_ = lambda model: torch.compile(model, fullgraph=True, backend=ctx.compile_backend)
    try:
        return model_rows(ctx, "discriminator", ElectraForPreTraining,
                          f"torch.compile(fullgraph, {ctx.compile_backend}) ElectraForPreTraining", compile_,
                          num_hidden_layers=1 if ctx.toy else 2)
    finally:
        torch._dynamo.reset()
