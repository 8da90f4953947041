"""What every part of the GPU evidence command sees: the device, TOY or not, the dtypes, a scratch folder, the
measured ceilings (once per process), and whether this is a warm-up run whose results are thrown away."""

import dataclasses
import pathlib
from typing import Any

import torch

from ..common import Bench


class WarmBench(Bench):
    """A Bench that runs each timed function once and times nothing: a kernel benchmark run through it compiles
    exactly the kernels (and torch.compile graphs) the timed run will launch, for the compile caches."""

    def _measure_ceilings(self) -> dict[str, float]:
        return {"matmul_tflops": 1.0, "copy_gbps": 1.0}

    def time_ms(self, fn, input_sets=None) -> dict[str, float]:
        fn(*(input_sets[0] if input_sets else ()))
        return {"median": 1.0, "p20": 1.0, "p80": 1.0}


@dataclasses.dataclass
class Context:
    device: torch.device
    toy: bool
    scratch: pathlib.Path  # outside --out: per-benchmark files that must not count against its 8 files
    warm: bool = False  # a warm-up run in a worker process: compile, measure nothing
    _bench: Bench | None = dataclasses.field(default=None, repr=False)

    @property
    def dtypes(self) -> list[torch.dtype]:
        # bf16 is GPU-only: the interpreter's tl.dot on bf16 is wrong (triton-lang/triton#11584).
        return [torch.bfloat16, torch.float16] if self.device.type == "cuda" else [torch.float16]

    @property
    def autocast_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float16

    @property
    def compile_backend(self) -> str:
        # Inductor's C++ build on a 2-core CPU takes minutes: TOY runs trace with dynamo only (as benchmarks.pretrain).
        return "inductor" if self.device.type == "cuda" else "eager"

    @property
    def bench(self) -> Bench:
        """The kernel benchmarks' harness; its ceilings are measured on first use."""
        if self._bench is None:
            self._bench = (WarmBench if self.warm else Bench)(self.device, toy=self.toy)
        return self._bench

    def settings(self) -> dict[str, Any]:
        """Picklable: what a worker process needs to build its own Context."""
        return {"device": str(self.device), "toy": self.toy, "scratch": str(self.scratch)}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], warm: bool) -> "Context":
        return cls(torch.device(settings["device"]), settings["toy"], pathlib.Path(settings["scratch"]), warm)
