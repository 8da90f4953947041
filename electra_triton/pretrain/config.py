"""Run configuration of `electra-triton pretrain`: preset defaults < config file (JSON/YAML) < command-line flags.

Every field of `PretrainConfig` is a flag (`--max-steps`, `--mask-prob`, ...); every field of the discriminator and
generator `ElectraConfig` (see `electra_triton.presets`) is a flag too (`--disc-num-hidden-layers 4`,
`--gen-hidden-size 128`) and a `discriminator:` / `generator:` mapping in the config file.
"""

import argparse
import dataclasses
import json
import pathlib
from typing import Any

import yaml

from ..presets import PRESETS

# Training defaults per preset. small/base/large follow the ELECTRA paper (Clark et al. 2020, table 6): learning
# rate, batch size, sequence length and steps; warmup 10k steps. tiny is sized to finish on a 2-core CPU in 3 minutes:
# the built-in corpus's documents (docstrings) average ~57 tokens, so 32-token examples waste little to padding and
# a 32-example batch sees as many tokens as 8 of 128 for a quarter of the attention cost (see the README's demo).
# tiny samples its replacements at temperature 2 (the paper: 1): at 1 the samples of a generator that has barely left
# the unigram plateau are frequent tokens, which a 2-layer discriminator trained for 1000 steps cannot tell from the
# originals without the context it has not learnt to use (held-out AUC ~0.58); at 2 they are flatter and it learns
# to spot them (AUC ~0.77). It makes the task easier, not the discriminator stronger.
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"max_steps": 1000, "batch_size": 32, "max_seq_len": 32, "lr": 2e-3, "warmup_steps": 100,
             "temperature": 2.0, "save_every": 250, "log_every": 25, "eval_every": 200},
    "small": {"max_steps": 1_000_000, "batch_size": 128, "max_seq_len": 128, "lr": 5e-4, "warmup_steps": 10_000,
              "temperature": 1.0, "save_every": 10_000, "log_every": 100, "eval_every": 10_000},
    "base": {"max_steps": 766_000, "batch_size": 256, "max_seq_len": 512, "lr": 2e-4, "warmup_steps": 10_000,
             "temperature": 1.0, "save_every": 10_000, "log_every": 100, "eval_every": 10_000},
    "large": {"max_steps": 400_000, "batch_size": 2048, "max_seq_len": 512, "lr": 2e-4, "warmup_steps": 10_000,
              "temperature": 1.0, "save_every": 10_000, "log_every": 100, "eval_every": 10_000},
}

BUILTIN_CORPUS = "stdlib"


@dataclasses.dataclass
class PretrainConfig:
    """Everything a pre-training run depends on. None means "the preset's default" (see TRAINING_DEFAULTS)."""

    preset: str = "tiny"
    corpus: list[str] | None = None  # raw text, tokenized on the fly; default (without --data) the built-in corpus
    data: str | None = None  # a folder written by `electra-triton prepare`
    packing: str = "auto"  # auto | on | off: several examples per row (auto: on unless the kernels lack unpad_plan)
    tokenizer: str | None = None  # a local HF tokenizer folder; None trains a WordPiece vocab on the corpus
    vocab_size: int | None = None  # size of the trained WordPiece vocab (default: the preset's vocab_size)
    tokenizer_train_docs: int = 200_000  # documents read to train the WordPiece vocab
    output_dir: str | None = None  # default: ./electra-<preset>
    max_steps: int | None = None
    batch_size: int | None = None  # sequences per device per micro-step
    grad_accum: int = 1
    max_seq_len: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    mask_prob: float = 0.15  # share of non-special tokens the generator predicts
    mask_token_prob: float = 0.85  # of those, replaced by [MASK]
    random_token_prob: float = 0.0  # of those, replaced by a random token; the rest stay unchanged
    rtd_weight: float = 50.0  # loss = mlm + rtd_weight * rtd
    temperature: float | None = None  # generator sampling temperature
    shuffle_buffer: int = 256  # examples shuffled together (per rank)
    seed: int = 0
    save_every: int | None = None
    keep_checkpoints: int = 3
    log_every: int | None = None
    eval_every: int | None = None  # held-out evaluation every N optimizer steps, and at the end
    eval_docs: int | None = None  # held-out documents; None: evaluate.DEFAULT_EVAL_DOCS, at most a tenth of the corpus
    eval_corpus: list[str] | None = None  # evaluate on the first --eval-docs documents of these paths instead
    report_to: str = "none"  # none | tensorboard
    resume: bool = False
    kernels: str = "auto"  # auto | triton | reference
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    fsdp: bool = False
    dist_timeout_s: float = 600.0  # bound on every collective (and the rendezvous) of a distributed run
    discriminator: dict[str, Any] = dataclasses.field(default_factory=dict)  # ElectraConfig overrides
    generator: dict[str, Any] = dataclasses.field(default_factory=dict)

    def resolved(self) -> "PretrainConfig":
        """A copy with the preset's defaults filled in, validated."""
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        cfg = dataclasses.replace(self)
        for key, value in TRAINING_DEFAULTS[self.preset].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.output_dir is None:
            cfg.output_dir = f"electra-{cfg.preset}"
        if cfg.data is not None and cfg.corpus is not None:
            raise ValueError(
                f"--data {cfg.data} and --corpus {' '.join(cfg.corpus)} are both given: pass one. --data reads a "
                "folder prepared by `electra-triton prepare`; --corpus tokenizes raw text on the fly"
            )
        if cfg.data is None and cfg.corpus is None:
            cfg.corpus = [BUILTIN_CORPUS]
        if cfg.vocab_size is None:
            cfg.vocab_size = PRESETS[cfg.preset]["discriminator"]["vocab_size"]
        cfg.validate()
        return cfg

    def model_config(self, role: str) -> dict[str, Any]:
        """ElectraConfig fields of the discriminator or generator: preset, then overrides."""
        return {**PRESETS[self.preset][role], **getattr(self, role)}

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "max_seq_len", "save_every", "log_every", "eval_every",
                    "keep_checkpoints", "vocab_size", "tokenizer_train_docs", "shuffle_buffer")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.eval_docs is not None and self.eval_docs < 0:
            raise ValueError(f"--eval-docs must be >= 0 (0: no evaluation), got {self.eval_docs}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"--dist-timeout-s must be > 0, got {self.dist_timeout_s}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                f"--mask-token-prob ({self.mask_token_prob}) and --random-token-prob ({self.random_token_prob}) must "
                "be >= 0 and sum to at most 1 (the rest of the masked positions keep their token)"
            )
        if self.max_seq_len < 8:
            raise ValueError(f"--max-seq-len must be >= 8, got {self.max_seq_len}")
        for role in ("discriminator", "generator"):
            limit = self.model_config(role)["max_position_embeddings"]
            if self.max_seq_len > limit:
                prefix = "disc" if role == "discriminator" else "gen"
                raise ValueError(
                    f"--max-seq-len {self.max_seq_len} exceeds the {role}'s max_position_embeddings ({limit}) of "
                    f"preset {self.preset!r}: use --max-seq-len {limit} or less, or raise --{prefix}-max-position-"
                    "embeddings"
                )
        if self.model_config("discriminator")["embedding_size"] != self.model_config("generator")["embedding_size"]:
            raise ValueError(
                "the generator and discriminator share their embeddings, so their embedding_size must be equal: "
                "set --disc-embedding-size and --gen-embedding-size to the same value"
            )
        choices = {"kernels": ("auto", "triton", "reference"), "precision": ("auto", "bf16", "fp32"),
                   "device": ("auto", "cpu", "cuda"), "packing": ("auto", "on", "off"),
                   "report_to": ("none", "tensorboard")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.data is None and not self.corpus:
            raise ValueError("--corpus needs at least one file or folder")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


_MODEL_FIELDS = sorted(PRESETS["base"]["discriminator"])
_ROLE_PREFIX = {"discriminator": "disc", "generator": "gen"}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="electra-triton pretrain",
        description="Pre-train an ELECTRA generator + discriminator (HF transformers models, Triton kernels on GPU). "
        "With no arguments: the tiny preset on the docstrings of this Python installation, a few minutes on a CPU.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="JSON or YAML file with any of the fields below (flags override it)")
    for field in dataclasses.fields(PretrainConfig):
        if field.name in ("discriminator", "generator"):
            continue
        flag = "--" + _flag(field.name)
        if field.name in ("resume", "fsdp"):
            parser.add_argument(flag, action="store_true", help=_HELP.get(field.name))
        elif field.name in ("corpus", "eval_corpus"):
            parser.add_argument(flag, nargs="+", help=_HELP[field.name])
        else:
            kind = {"int | None": int, "float | None": float, "str | None": str}.get(str(field.type), field.type)
            if kind is bool:
                kind = _bool
            choices = {"preset": sorted(PRESETS), "kernels": ["auto", "triton", "reference"],
                       "precision": ["auto", "bf16", "fp32"], "device": ["auto", "cpu", "cuda"],
                       "packing": ["auto", "on", "off"], "report_to": ["none", "tensorboard"]}.get(field.name)
            parser.add_argument(flag, type=kind, choices=choices, help=_HELP.get(field.name))
    group = parser.add_argument_group("model size overrides (ElectraConfig fields; --disc-* or --gen-*)")
    for role, prefix in _ROLE_PREFIX.items():
        for name in _MODEL_FIELDS:
            value = PRESETS["base"][role][name]
            kind = _bool if isinstance(value, bool) else type(value)
            group.add_argument(f"--{prefix}-{_flag(name)}", dest=f"{role}.{name}", type=kind,
                               metavar=kind.__name__.upper())
    return parser


_HELP = {
    "preset": "model sizes and training defaults: tiny (CPU, minutes), small, base, large (default tiny)",
    "corpus": f"text files (blank line between documents), folders of them, or .jsonl files with a 'text' field; "
    f"'{BUILTIN_CORPUS}' is the built-in corpus (docstrings of the Python standard library). Default {BUILTIN_CORPUS}",
    "data": "a folder prepared by `electra-triton prepare` (token shards; instead of --corpus)",
    "packing": "several examples per row of --max-seq-len, each attending only to itself (auto: on, except with "
    "kernels whose encoder takes no unpad_plan); off: one example per row, padded",
    "tokenizer": "a local Hugging Face tokenizer folder; default: train a WordPiece vocab on the corpus (with --data: "
    "the data's own; a --tokenizer must be the one the data was prepared with)",
    "output_dir": "where metrics, checkpoints and the final models go (default ./electra-<preset>)",
    "max_steps": "optimizer steps (default: the preset's)",
    "batch_size": "sequences per device per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "temperature": "temperature of the generator's sampled replacements (default: the preset's; tiny 2, others 1 "
    "as in the paper)",
    "resume": "continue from the newest valid checkpoint in --output-dir",
    "kernels": "auto: Triton kernels on CUDA, PyTorch reference ops on CPU; triton: kernels or fail; reference",
    "fsdp": "shard parameters, gradients and optimizer state with FSDP2 (fully_shard per layer) under torchrun",
    "dist_timeout_s": "seconds a distributed collective or the rendezvous may wait before the run fails (default "
    "600); a rank that fails stops the others at once, this bounds a rank that hangs",
    "save_every": "checkpoint every N optimizer steps",
    "eval_every": "evaluate on the held-out documents every N optimizer steps and at the end (default: the preset's)",
    "eval_docs": "hold out the first K documents of the corpus (in corpus order) for evaluation; 0: no evaluation "
    "(default 250, at most a tenth of the corpus)",
    "eval_corpus": "evaluate on the first --eval-docs documents of these files or folders instead (the training corpus "
    "is then used whole)",
    "report_to": "also log the metrics to TensorBoard (OUTPUT_DIR/tensorboard; needs the tensorboard package)",
    "seed": "seed of initialisation, masking, sampling, dropout and data order",
}


def load_config_file(path: str) -> dict[str, Any]:
    file = pathlib.Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read it ({error.strerror})") from error
    data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of field names to values")
    known = {field.name for field in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown fields {unknown}; known: {sorted(known)}")
    for key in ("corpus", "eval_corpus"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    return data


def parse_args(argv: list[str], saved: dict[str, Any] | None = None) -> PretrainConfig:
    """Flags over the config file over `saved` (the config a resumed run was started with) over the defaults."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = dict(saved or {})
    for key in ("discriminator", "generator"):
        values[key] = dict(values.get(key, {}))
    if "config" in args:
        file_values = load_config_file(args.pop("config"))
        for key in ("discriminator", "generator"):
            values[key].update(file_values.pop(key, None) or {})
        values.update(file_values)
    for key, value in args.items():
        if "." in key:
            role, name = key.split(".", 1)
            values[role][name] = value
        else:
            values[key] = value
    return PretrainConfig(**values)


def explicit_flags(argv: list[str]) -> dict[str, Any]:
    """The fields given on the command line (to find --output-dir and --resume before the full parse)."""
    return vars(build_parser().parse_args(argv))
