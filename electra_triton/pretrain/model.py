"""The ELECTRA pre-training model: an HF generator and discriminator with shared embeddings, and the recipe's math.

Follows google-research/electra (run_pretraining.py, pretrain_helpers.py): mask 15% of the non-special tokens
(85% -> [MASK], the rest unchanged, optionally a random-token share), the generator predicts the masked positions
only (its LM head runs on the gathered positions), replacements are sampled with Gumbel-max in fp32 without gradient,
the discriminator labels a token replaced iff the sample differs from the original, loss = mlm + 50 * rtd.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

from .. import ops
from ..integration import fused_modules
from ..ops import UnpadPlan


def build_models(disc_fields: dict[str, Any], gen_fields: dict[str, Any], tokenizer) -> tuple[
        ElectraForMaskedLM, ElectraForPreTraining]:
    """Fresh generator and discriminator sized for `tokenizer`, embeddings shared (generator's lm head tied to them)."""
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    discriminator = ElectraForPreTraining(ElectraConfig(**{**disc_fields, **common}))
    generator = ElectraForMaskedLM(ElectraConfig(**{**gen_fields, **common}))
    share_embeddings(generator, discriminator)
    return generator, discriminator


def share_embeddings(generator: ElectraForMaskedLM, discriminator: ElectraForPreTraining) -> None:
    # ELECTRA shares word, position and token-type embeddings and their LayerNorm (HF's ElectraEmbeddings module);
    # embeddings_project (embedding -> hidden size) stays per model, as in the original.
    generator.electra.embeddings = discriminator.electra.embeddings
    generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight


def max_predictions(max_seq_len: int, mask_prob: float) -> int:
    # The original's max_predictions_per_seq = (mask_prob + 0.005) * max_seq_length: a fixed number of slots per
    # sequence, so that the masked positions gather to a static shape (no host sync, compiler friendly).
    return max(1, int((mask_prob + 0.005) * max_seq_len))


def prediction_slots(max_seq_len: int, mask_prob: float, packing: bool) -> int:
    """Masked positions per row. A packed row's examples each round their count and mask at least one token: room
    for that on top of the unpacked budget, enough for rows of many short examples (the packer keeps within it)."""
    return min(max_seq_len, max_predictions(max_seq_len, mask_prob) + (max_seq_len // 16 if packing else 0))


def predictions_bound(length: int, mask_prob: float) -> int:
    """An upper bound of the positions `mask_tokens` masks in an example of `length` slots: round(p * candidates)
    or 1, candidates <= length - 2 ([CLS] and a [SEP] are never candidates)."""
    candidates = max(length - 2, 0)
    return min(candidates, int(candidates * mask_prob) + 1)


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor, mask_id: int, vocab_size: int,
    mask_prob: float, mask_token_prob: float, random_token_prob: float, num_slots: int,
    generator: torch.Generator | None = None, position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Choose the positions the generator predicts and corrupt them, per example.

    input_ids, attention_mask: (B, L). position_ids (B, L): packed rows, a new example at each real token with
    position 0; without them a row is one example. Each example masks round(mask_prob * candidates) of its
    non-special tokens, at least 1, chosen uniformly. Returns masked_ids (B, L); positions, targets, weights: (B, P)
    where P = num_slots and weights marks the slots in use. A row never masks more than P positions (the packer keeps
    rows within P, see predictions_bound); static shapes throughout, no host synchronisation.
    """
    B, L = input_ids.shape
    device = input_ids.device
    real = attention_mask == 1
    candidate = (real & ~torch.isin(input_ids, special_ids)).flatten()  # (B*L,)
    starts = torch.zeros_like(real)
    starts[:, 0] = True  # every row starts an example: rows never share one
    if position_ids is not None:
        starts |= real & (position_ids == 0)
    example = torch.cumsum(starts.flatten(), 0) - 1  # (B*L,) example id of each slot, < B*L
    candidates = torch.zeros(B * L, dtype=torch.long, device=device).scatter_add_(0, example, candidate.long())
    num_to_mask = torch.minimum((candidates.float() * mask_prob).round().long().clamp_min(1), candidates)  # per example
    # Rank of each candidate among its example's candidates, in a random order: the first num_to_mask are masked.
    scores = torch.rand(B * L, device=device, generator=generator, dtype=torch.float64)
    order = torch.argsort(example.double() + torch.where(candidate, scores * 0.5, 0.75))
    sizes = torch.zeros_like(candidates).scatter_add_(0, example, torch.ones_like(example))  # slots per example
    group_start = torch.cumsum(sizes, 0) - sizes  # where each example begins in the sorted order
    rank = torch.empty_like(example).scatter_(0, order, torch.arange(B * L, device=device))
    chosen = candidate & (rank - group_start[example] < num_to_mask[example])  # (B*L,)
    # Gather each row's chosen positions into its P slots (in random order), unused slots after them.
    slots = min(num_slots, L)
    row_scores = (chosen.double() * 2 + scores).view(B, L)
    top, positions = row_scores.topk(slots, dim=1)  # (B, P)
    weights = top >= 2
    targets = input_ids.gather(1, positions)  # (B, P)
    draw = torch.rand(positions.shape, device=device, generator=generator)
    random_tokens = torch.randint(vocab_size, positions.shape, device=device, generator=generator)
    replacement = torch.where(draw < mask_token_prob, mask_id, targets)
    replacement = torch.where((draw >= mask_token_prob) & (draw < mask_token_prob + random_token_prob),
                              random_tokens, replacement)
    masked_ids = input_ids.scatter(1, positions, torch.where(weights, replacement, targets))
    return {"masked_ids": masked_ids, "positions": positions, "targets": targets, "weights": weights}


def gumbel_sample(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """argmax(logits / T + Gumbel noise), in fp32 and without gradient: a sample from softmax(logits / T)."""
    with torch.no_grad():
        uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
        gumbel = -torch.log(-torch.log(uniform + 1e-9) + 1e-9)
        return (logits.detach().float() / temperature + gumbel).argmax(-1)


def block_diagonal_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
                        ) -> torch.Tensor:
    """(B, 1, L, L) additive mask of packed rows for transformers' eager/SDPA attention: a token sees the real tokens
    of its own example (examples start at position id 0), nothing else. A padding slot counts as part of the row's
    last example, so that its query row has keys to attend to and stays finite (its output is never read)."""
    real = attention_mask.bool()
    starts = (position_ids == 0) & real
    example = torch.cumsum(starts.long(), dim=1)  # (B, L): 1, 2, ... per example; padding keeps the last one
    same = (example[:, :, None] == example[:, None, :]) & real[:, None, :]
    return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)[:, None]


def encoder_inputs(attention_mask: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor | None,
                   unpad_plan: UnpadPlan | None, like: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments both encoders get. Packed rows without an unpad plan (stock transformers models, or
    kernels whose encoder takes none) get a block-diagonal mask in the dtype attention computes in (`like`'s, or
    autocast's)."""
    inputs: dict[str, Any] = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
        if unpad_plan is None:
            device = like.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
            inputs["attention_mask"] = block_diagonal_mask(attention_mask, position_ids, dtype)
    if unpad_plan is not None:
        inputs["unpad_plan"] = unpad_plan
    return inputs


def accepts_unpad_plan(model: nn.Module) -> bool:
    """Whether the model's encoder serves a packed `unpad_plan=`: electra_triton.patch with the fused attention,
    which unpads once per forward (its encoder refuses a plan otherwise, and reads a 4D mask's first row only)."""
    return fused_modules(model).get("electra", {}).get("encoder") == "auto"


class ElectraPretrainer(nn.Module):
    """Generator + discriminator as one module (one DDP/FSDP unit). forward(batch) -> losses and metric sums."""

    def __init__(self, generator: ElectraForMaskedLM, discriminator: ElectraForPreTraining, special_ids: list[int],
                 mask_id: int, mask_prob: float = 0.15, mask_token_prob: float = 0.85,
                 random_token_prob: float = 0.0, rtd_weight: float = 50.0, temperature: float = 1.0,
                 max_seq_len: int = 128, packing: bool = False):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.register_buffer("special_ids", torch.tensor(special_ids, dtype=torch.long), persistent=False)
        self.mask_id = mask_id
        self.mask_prob = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob
        self.rtd_weight = rtd_weight
        self.temperature = temperature
        self.num_slots = prediction_slots(max_seq_len, mask_prob, packing)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None, unpad_plan: UnpadPlan | None = None,
                rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """position_ids (B, L): packed rows (several examples per row, each from position 0); unpad_plan: the batch's
        `electra_triton.ops.UnpadPlan`, for encoders that take one (the kernels'), which then keep each example to
        itself. Packed rows without a plan are kept apart by a block-diagonal attention mask. rng draws the masks and
        the generator's samples (evaluation passes a freshly seeded one, so that every evaluation masks alike); None:
        torch's default generator. Returns losses and metric sums, and the per-token outputs evaluation reads."""
        vocab_size = self.generator.config.vocab_size
        masked = mask_tokens(input_ids, attention_mask, self.special_ids, self.mask_id, vocab_size, self.mask_prob,
                             self.mask_token_prob, self.random_token_prob, self.num_slots, rng,
                             position_ids=position_ids)
        positions, targets, weights = masked["positions"], masked["targets"], masked["weights"]  # (B, P)
        inputs = encoder_inputs(attention_mask, token_type_ids, position_ids, unpad_plan,
                                self.discriminator.electra.embeddings.word_embeddings.weight)

        hidden = self.generator.electra(masked["masked_ids"], **inputs).last_hidden_state  # (B, L, Hg)
        # Only the masked positions reach the LM head: P of L positions, P ~ 0.15 L.
        gathered = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, P, Hg)
        predicted = self.generator.generator_predictions(gathered)  # (B, P, E)
        head = self.generator.generator_lm_head
        num_predicted = weights.sum()
        if "mlm_loss" in getattr(head, "_electra_triton", {}):
            # electra_triton.patch fused the LM head: one logits GEMM, then one kernel pass gives loss, sample, argmax.
            mlm_loss, sampled, predicted_ids = ops.generator_head(
                predicted, head.weight, head.bias, torch.where(weights, targets, -100), self.temperature, generator=rng)
        else:
            logits = head(predicted)  # (B, P, V)
            per_slot = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*P,)
            mlm_loss = (per_slot * weights.flatten()).sum() / num_predicted.clamp_min(1)
            sampled = gumbel_sample(logits, self.temperature, rng)  # (B, P)
            predicted_ids = logits.detach().argmax(-1)

        disc_ids = input_ids.scatter(1, positions, torch.where(weights, sampled, targets))  # (B, L)
        rtd_labels = ((disc_ids != input_ids) & (attention_mask == 1)).long()  # (B, L)
        if inputs["attention_mask"] is attention_mask:
            out = self.discriminator(disc_ids, labels=rtd_labels, **inputs)
            rtd_loss = out.loss.float()
        else:  # a block-diagonal mask, which the model's own loss cannot read: the same mean over real tokens here
            out = self.discriminator(disc_ids, **inputs)
            per_token = F.binary_cross_entropy_with_logits(out.logits.float(), rtd_labels.float(), reduction="none")
            real = (attention_mask == 1).float()
            rtd_loss = (per_token * real).sum() / real.sum().clamp_min(1)
        loss = mlm_loss + self.rtd_weight * rtd_loss

        with torch.no_grad():
            active = attention_mask == 1
            mlm_correct = ((predicted_ids == targets) & weights).sum()
            rtd_correct = (((out.logits > 0).long() == rtd_labels) & active).sum()
        return {
            "loss": loss, "mlm_loss": mlm_loss.detach(), "rtd_loss": rtd_loss.detach(),
            "mlm_correct": mlm_correct, "mlm_count": num_predicted, "rtd_correct": rtd_correct,
            "rtd_count": active.sum(), "replaced": rtd_labels.sum(),
            # Per-token outputs for evaluation: (B, L) discriminator logits and labels, (B, P) masked slots.
            "disc_logits": out.logits, "rtd_labels": rtd_labels, "mlm_predictions": predicted_ids, "sampled": sampled,
            "targets": targets, "weights": weights,
        }


def flops_per_token(disc: ElectraConfig, gen: ElectraConfig, seq_len: int, mask_prob: float) -> float:
    """Training FLOPs (forward + backward = 3x forward, matmuls only) per input token of one ELECTRA step."""

    def encoder(config: ElectraConfig) -> float:
        h, i = config.hidden_size, config.intermediate_size
        per_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * h  # projections + QK^T and PV
        project = 2 * config.embedding_size * h if config.embedding_size != h else 0
        return config.num_hidden_layers * per_layer + project

    gen_head = (mask_prob + 0.005) * 2 * (gen.hidden_size * gen.embedding_size + gen.embedding_size * gen.vocab_size)
    disc_head = 2 * (disc.hidden_size * disc.hidden_size + disc.hidden_size)
    return 3 * (encoder(disc) + encoder(gen) + gen_head + disc_head)


# bf16 dense tensor-core peak FLOP/s by device name, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in ELECTRA: no weight decay on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared parameters are listed once
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup_steps: int, max_steps: int):
    """LR factor: linear warmup, then linear decay to 0 at max_steps (ELECTRA's polynomial decay, power 1)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return factor

