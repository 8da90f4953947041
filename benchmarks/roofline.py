"""The roofline that turns a traced step's FLOPs and bytes into PROJECTED GPU time, and its efficiency factors.

An op takes max(compute time, memory time) plus a fixed cost per kernel launch, plus a stall per host sync:

    compute = FLOPs / (datasheet peak of its dtype x efficiency: `matmul`, or `attention` for fused attention)
    memory  = bytes read + written / (datasheet bandwidth x `memory`)

Peaks are datasheet numbers (dense, no sparsity). The efficiency factors are this project's assumptions, stated here
once so that a GPU run can calibrate them (benchmarks/gpu.py puts the projection beside each measurement): edit
`EFFICIENCY` with measured values, and every projection follows. Nothing here is a measurement.
"""

import dataclasses

from electra_triton.op_costs import OpCost

LABEL = "PROJECTED"


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    matmul_tflops: dict[str, float]  # dense tensor-core peak by dtype
    memory_tbps: float


# fp32 matmuls run without TF32 (PyTorch's default "highest" precision): the 67 TFLOP/s of the CUDA cores.
H100 = Device("H100 SXM", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 3.35)
H200 = Device("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 4.8)
DEVICES = {"H100": H100, "H200": H200}


@dataclasses.dataclass(frozen=True)
class Efficiency:
    matmul: float = 0.70  # share of the peak a cuBLAS GEMM of these shapes reaches
    attention: float = 0.45  # fused attention (forward and backward together), FlashAttention-2-like kernels
    memory: float = 0.80  # share of the bandwidth a streaming kernel reaches
    kernel_us: float = 3.0  # per launch: launch gap and the tail of a short kernel
    host_sync_us: float = 30.0  # per host sync: the queue drains, the host waits, launches restart

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


EFFICIENCY = Efficiency()


def op_time_us(cost: OpCost, device: Device, efficiency: Efficiency = EFFICIENCY) -> float:
    """PROJECTED time of one op on `device`, in microseconds."""
    compute = 0.0
    if cost.flops:
        peak = device.matmul_tflops.get(cost.matmul_dtype or "bfloat16", device.matmul_tflops["bfloat16"])
        share = efficiency.attention if cost.attention else efficiency.matmul
        compute = cost.flops / (peak * 1e12 * share) * 1e6
    memory = cost.bytes / (device.memory_tbps * 1e12 * efficiency.memory) * 1e6
    sync = efficiency.host_sync_us if cost.host_sync else 0.0
    return max(compute, memory) + cost.kernels * efficiency.kernel_us + sync
