"""Test harness: the real kernels run compiled on a GPU, or in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before any kernel module is imported (triton reads it when a kernel is decorated), so it
is set here, at collection time, and only when no CUDA device exists.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"

# bf16 runs on GPU only: the interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584).
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
gpu_only_bf16 = pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, requires_cuda], id="bfloat16")
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"), gpu_only_bf16]


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _kernel_mode():
    # An in-process pre-training run (`pretrain.run`, also inside benchmark runs that module-scoped fixtures make)
    # sets the ops' kernel mode for the whole process: every test starts from the default, "auto".
    from electra_triton.ops import set_kernel_mode

    set_kernel_mode("auto")
    yield
    set_kernel_mode("auto")
