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


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor, mask_id: int, vocab_size: int,
    mask_prob: float, mask_token_prob: float, random_token_prob: float, num_slots: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Choose the positions the generator predicts and corrupt them.

    input_ids, attention_mask: (B, L). Returns masked_ids (B, L); positions, targets, weights: (B, P) where P =
    num_slots and weights marks the slots in use (round(mask_prob * candidates) per sequence, at least 1, at most P).
    """
    B, L = input_ids.shape
    candidate = (attention_mask == 1) & ~torch.isin(input_ids, special_ids)  # (B, L)
    num_to_mask = (candidate.sum(1).float() * mask_prob).round().long().clamp(1, min(num_slots, L))  # (B,)
    num_to_mask = torch.minimum(num_to_mask, candidate.sum(1))
    scores = torch.rand((B, L), device=input_ids.device, generator=generator)
    scores = torch.where(candidate, scores, -1.0)
    positions = scores.topk(min(num_slots, L), dim=1).indices  # (B, P): distinct positions, random order
    weights = torch.arange(positions.shape[1], device=input_ids.device)[None, :] < num_to_mask[:, None]  # (B, P)
    targets = input_ids.gather(1, positions)  # (B, P)
    draw = torch.rand(positions.shape, device=input_ids.device, generator=generator)
    random_tokens = torch.randint(vocab_size, positions.shape, device=input_ids.device, generator=generator)
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


class ElectraPretrainer(nn.Module):
    """Generator + discriminator as one module (one DDP/FSDP unit). forward(batch) -> losses and metric sums."""

    def __init__(self, generator: ElectraForMaskedLM, discriminator: ElectraForPreTraining, special_ids: list[int],
                 mask_id: int, mask_prob: float = 0.15, mask_token_prob: float = 0.85,
                 random_token_prob: float = 0.0, rtd_weight: float = 50.0, temperature: float = 1.0,
                 max_seq_len: int = 128):
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
        self.num_slots = max_predictions(max_seq_len, mask_prob)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses and metric sums of one batch, plus the per-token outputs evaluation reads (see metrics.py).

        rng draws the masks and the generator's samples (evaluation passes a freshly seeded one so that every
        evaluation masks alike); None draws from torch's default generator.
        """
        vocab_size = self.generator.config.vocab_size
        masked = mask_tokens(input_ids, attention_mask, self.special_ids, self.mask_id, vocab_size, self.mask_prob,
                             self.mask_token_prob, self.random_token_prob, self.num_slots, rng)
        positions, targets, weights = masked["positions"], masked["targets"], masked["weights"]  # (B, P)

        hidden = self.generator.electra(masked["masked_ids"], attention_mask=attention_mask,
                                        token_type_ids=token_type_ids).last_hidden_state  # (B, L, Hg)
        # Only the masked positions reach the LM head: P of L positions, P ~ 0.15 L.
        gathered = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, P, Hg)
        predicted = self.generator.generator_predictions(gathered)  # (B, P, E)
        head = self.generator.generator_lm_head
        num_predicted = weights.sum()
        if "mlm_loss" in getattr(head, "_electra_triton", {}):
            # electra_triton.patch made the LM head a fused projection + cross-entropy; logits are kept for sampling.
            mlm_loss, logits = head(predicted, labels=torch.where(weights, targets, -100), return_logits=True)
        else:
            logits = head(predicted)  # (B, P, V)
            per_slot = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*P,)
            mlm_loss = (per_slot * weights.flatten()).sum() / num_predicted.clamp_min(1)

        sampled = gumbel_sample(logits, self.temperature, rng)  # (B, P)
        disc_ids = input_ids.scatter(1, positions, torch.where(weights, sampled, targets))  # (B, L)
        rtd_labels = ((disc_ids != input_ids) & (attention_mask == 1)).long()  # (B, L)
        out = self.discriminator(disc_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                 labels=rtd_labels)
        rtd_loss = out.loss.float()
        loss = mlm_loss + self.rtd_weight * rtd_loss

        with torch.no_grad():
            active = attention_mask == 1
            predictions = logits.argmax(-1)
            mlm_correct = ((predictions == targets) & weights).sum()
            rtd_correct = (((out.logits > 0).long() == rtd_labels) & active).sum()
        return {
            "loss": loss, "mlm_loss": mlm_loss.detach(), "rtd_loss": rtd_loss.detach(),
            "mlm_correct": mlm_correct, "mlm_count": num_predicted, "rtd_correct": rtd_correct,
            "rtd_count": active.sum(), "replaced": rtd_labels.sum(),
            # Per-token outputs for evaluation: (B, L) discriminator logits and labels, (B, P) masked slots.
            "disc_logits": out.logits, "rtd_labels": rtd_labels, "mlm_predictions": predictions, "sampled": sampled,
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

