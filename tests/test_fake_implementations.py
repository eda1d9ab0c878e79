"""Every custom op's fake implementation against the op itself: same output shapes, dtypes and strides.

torch.compile plans its buffers from the fake implementations. With Inductor, a real output whose strides differ
from the fake's fails an assertion at run time, or without those assertions is read with the wrong layout. The
tests elsewhere compile with the eager and aot_eager backends, which never compare the two, and an op with one
head per branch has size-1 dimensions where any strides agree: so these inputs have several heads and channels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_device import KERNEL_DEVICE as DEVICE  # noqa: E402
from torch.library import opcheck  # noqa: E402

import rgt_fast.kernels.add_layer_norm  # noqa: E402,F401  (registers the ops)
import rgt_fast.kernels.lsa_attention  # noqa: E402,F401
import rgt_fast.kernels.rgsa_attention  # noqa: E402,F401
import rgt_fast.kernels.spatial_gate  # noqa: E402,F401

ops = torch.ops.rgt_fast
CHECKS = ("test_schema", "test_faketensor")


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def assert_fake_matches(op, args):
    results = opcheck(op, args, test_utils=CHECKS)
    assert results == {check: "SUCCESS" for check in CHECKS}


@pytest.mark.usefixtures("whole_window_tiles")
@pytest.mark.parametrize("transposed_tables", [False, True], ids=["tables", "transposed-tables"])
def test_lsa_attention(transposed_tables):
    H, W, heads, channels = 8, 32, 6, 36  # three heads per branch: the table gradients have two real strides
    qkv = randn(2, H * W, 3 * channels + 5)[..., :3 * channels]  # a strided view, as a projection slice is
    tables = [randn(3, 15 * 63).t() if transposed_tables else randn(15 * 63, 3) for _ in range(2)]
    shape_args = (H, W, heads, [8, 32], True)
    forward_args = (qkv, *shape_args, *tables, 0.3)
    assert_fake_matches(ops.lsa_attention.default, forward_args)
    out, lse = ops.lsa_attention(*forward_args)
    assert_fake_matches(ops.lsa_attention_backward.default,
                        (randn(*out.shape), qkv, out, lse, *shape_args, *tables, 0.3))


def test_rgsa_attention():
    heads = 3
    q = randn(2, 37, heads * 15 + 4)[..., :heads * 15].unflatten(-1, (heads, 15))
    k, v = randn(2, 17, heads, 15), randn(2, 17, heads, 30)
    assert_fake_matches(ops.rgsa_attention_forward.default, (q, k, v, 0.25, 0))
    out, lse = ops.rgsa_attention_forward(q, k, v, 0.25, 0)
    assert_fake_matches(ops.rgsa_attention_backward.default, (randn(*out.shape), q, k, v, out, lse, 0.25, 0))


@pytest.mark.parametrize("projected", [False, True], ids=["gate", "gate+projection"])
def test_spatial_gate(projected):
    height, width, channels = 5, 7, 12
    hidden = randn(2, height * width, 2 * channels)
    parameters = (randn(channels), randn(channels), randn(channels, 1, 3, 3), randn(channels))
    projection = (randn(9, channels), randn(9)) if projected else (None, None)
    assert_fake_matches(ops.spatial_gate_forward.default, (hidden, height, width, *parameters, 1e-5, *projection))
    assert_fake_matches(ops.spatial_gate_backward.default,
                        (randn(2, height * width, channels), hidden, height, width, *parameters, 1e-5, projected))


PROJECTED = pytest.mark.parametrize("projected", [False, True], ids=["norm", "norm+projection"])


@PROJECTED
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm(delta_dtype, projected):
    x, delta, weight, bias = randn(2, 9, 20), randn(2, 9, 20, dtype=delta_dtype), randn(20), randn(20)
    projection = (randn(7, 20), randn(7)) if projected else (None, None)
    forward_args = (x, delta, weight, bias, 1e-5, torch.bfloat16, *projection)
    assert_fake_matches(ops.add_layer_norm_forward.default, forward_args)
    summed, _, mean, rstd = ops.add_layer_norm_forward(*forward_args)
    dnormed = randn(*x.shape, dtype=torch.bfloat16)
    for dsummed in (randn(*summed.shape), None):
        assert_fake_matches(ops.add_layer_norm_backward.default,
                            (dsummed, dnormed, x, delta, mean, rstd, weight, bias, torch.bfloat16, projected))


@PROJECTED
def test_layer_norm(projected):
    x, weight, bias = randn(2, 9, 20), randn(20), randn(20)
    projection = (randn(7, 20), randn(7)) if projected else (None, None)
    forward_args = (x, weight, bias, 1e-5, torch.bfloat16, *projection)
    assert_fake_matches(ops.layer_norm_forward.default, forward_args)
    _, mean, rstd = ops.layer_norm_forward(*forward_args)
    assert_fake_matches(ops.layer_norm_backward.default,
                        (randn(*x.shape, dtype=torch.bfloat16), x, mean, rstd, weight, bias, torch.bfloat16,
                         projected))
