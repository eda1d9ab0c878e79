"""The device kernel tests run on: CPU tensors under Triton's interpreter, else CUDA, else the module skips.

Import it after TRITON_INTERPRET is set (conftest sets it unless the environment already did).
"""
import pytest
import torch

from rgt_fast.kernels._common import INTERPRET

if INTERPRET:
    KERNEL_DEVICE = "cpu"
elif torch.cuda.is_available():
    KERNEL_DEVICE = "cuda"
else:
    pytest.skip("rgt_fast.kernels was imported without TRITON_INTERPRET=1 and there is no GPU: run pytest with "
                "TRITON_INTERPRET=1 set in the environment", allow_module_level=True)
