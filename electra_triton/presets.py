"""Model sizes of the released google/electra-{small,base,large}-{discriminator,generator} checkpoints, plus `tiny`.

Shared by the pre-training command, the benchmarks and the compile check (which compiles every kernel at every
configuration these sizes launch). Values are transformers.ElectraConfig fields.
"""

from typing import Any

_COMMON: dict[str, Any] = {
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "position_embedding_type": "absolute",
}


def _sizes(embedding: int, hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    return {
        **_COMMON,
        "embedding_size": embedding,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
    }


# The tiny demo learns from a few hundred steps on a ~400k-token corpus, so (measured, see the README):
# - a 2048-token vocab: an 8192-token one gives most tokens a handful of occurrences, and its embedding matrix
#   outweighs both encoders;
# - no dropout: a run this short underfits, dropout only slows it;
# - initializer_range 0.1 (about 1/sqrt(width)) instead of 0.02, which is sized for 768-wide models: at 0.02 the
#   attention logits of 64/128-wide layers start near zero and stay on the uniform-attention (unigram) plateau longer.
_TINY: dict[str, Any] = {"vocab_size": 2048, "max_position_embeddings": 128, "hidden_dropout_prob": 0.0,
                         "attention_probs_dropout_prob": 0.0, "initializer_range": 0.1}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Small enough to pre-train on a 2-core CPU in minutes; head dim 32 keeps it on the attention kernel.
    "tiny": {"discriminator": {**_sizes(64, 128, 2, 4, 512), **_TINY},
             "generator": {**_sizes(64, 64, 2, 2, 256), **_TINY}},
    "small": {"discriminator": _sizes(128, 256, 12, 4, 1024), "generator": _sizes(128, 256, 12, 4, 1024)},
    "base": {"discriminator": _sizes(768, 768, 12, 12, 3072), "generator": _sizes(768, 256, 12, 4, 1024)},
    "large": {"discriminator": _sizes(1024, 1024, 24, 16, 4096), "generator": _sizes(1024, 256, 24, 4, 1024)},
}

# The sizes the compile check covers: every released model, generators included.
RELEASED_PRESETS = ("small", "base", "large")


def model_sizes(names: tuple[str, ...] = RELEASED_PRESETS) -> list[dict[str, Any]]:
    """Every discriminator and generator config of the named presets, each tagged with "name" and "role"."""
    return [
        {**config, "name": name, "role": role}
        for name in names
        for role, config in PRESETS[name].items()
    ]
