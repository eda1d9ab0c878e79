"""The attention kernels read PyTorch's TF32 setting through either of its switches.

Since torch 2.9, reading the old switch (``torch.backends.cuda.matmul.allow_tf32``) raises once the new one
(``fp32_precision``) was set, so a kernel that read the old one failed on every float32 call after a user chose
TF32 the new way. The switches are process-wide and cannot be reset to "never set", so each case runs in a child
process.
"""
import json
import os
import subprocess
import sys

import pytest

CASE_PROGRAM = """
import importlib, json, sys, torch
lsa_attention = importlib.import_module("rgt_fast.kernels.lsa_attention")
rgsa_attention = importlib.import_module("rgt_fast.kernels.rgsa_attention")
from rgt_fast.kernels._common import fp32_matmuls_use_tf32
exec(sys.argv[1])
q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
rgsa_attention.rgsa_attention(q, k, v, 0.25)  # a float32 call must not raise
print(json.dumps({"uses_tf32": fp32_matmuls_use_tf32(),
                  "lsa": lsa_attention._input_precision(torch.float32),
                  "rgsa": rgsa_attention._operand_precision(torch.float32)}))
"""


def precision_after(setting: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", CASE_PROGRAM, setting], capture_output=True, text=True,
                               env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setting, tf32", [
    ("pass", False),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.backends.cuda.matmul.allow_tf32 = False", False),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'tf32'", True),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.set_float32_matmul_precision('highest')", False),
])
def test_either_switch_selects_the_kernels_precision(setting, tf32):
    expected = "tf32" if tf32 else "ieee"
    assert precision_after(setting) == {"uses_tf32": tf32, "lsa": expected, "rgsa": expected}
