"""The device kernel tests run on: CPU tensors under Triton's interpreter, else CUDA, else the module skips.

Import it after TRITON_INTERPRET is set (conftest sets it unless the environment already did).
"""
import pytest
import torch
from hypothesis import HealthCheck, settings

from rgt_fast.kernels._common import INTERPRET

if INTERPRET:
    KERNEL_DEVICE = "cpu"
elif torch.cuda.is_available():
    KERNEL_DEVICE = "cuda"
else:
    pytest.skip("rgt_fast.kernels was imported without TRITON_INTERPRET=1 and there is no GPU: run pytest with "
                "TRITON_INTERPRET=1 set in the environment", allow_module_level=True)


def drawn_shapes(examples_in_the_interpreter: int) -> settings:
    """Hypothesis settings of a kernel property test: fixed examples (the same every run), no deadline, and the
    test's fixtures held across examples. Compiled, every new head dim or channel count is a new kernel build
    (seconds each), and the lent GPUs' minutes are few: there a sample runs, and the interpreter covers the
    whole list."""
    examples = examples_in_the_interpreter if KERNEL_DEVICE == "cpu" else max(2, examples_in_the_interpreter // 6)
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
