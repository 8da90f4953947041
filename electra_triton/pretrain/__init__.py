"""ELECTRA pre-training: `electra-triton pretrain`, `python -m electra_triton.pretrain`, or torchrun of the latter.

    from electra_triton.pretrain import PretrainConfig, run
    run(PretrainConfig(preset="tiny", corpus=["my_texts/"], max_steps=1000))
"""

from .config import PretrainConfig, parse_args
from .train import main, run

__all__ = ["PretrainConfig", "main", "parse_args", "run"]
