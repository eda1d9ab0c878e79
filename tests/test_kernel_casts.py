"""Roundings inside kernels: fp32 -> bf16 casts round to nearest even, as PyTorch's do (the interpreter truncated
them); fp32 dot operands bound for TF32 MMAs round to nearest TF32, as cuBLAS's do (the MMA alone truncates)."""
import torch
import triton
import triton.language as tl

from kernel_device import KERNEL_DEVICE
from rgt_fast.kernels._common import round_to_tf32


@triton.jit
def _cast_to_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n).to(tl.bfloat16), mask=offsets < n)


def test_fp32_to_bf16_rounds_like_torch():
    # Magnitudes across the normal range, signed zero, infinities, exact ties and a round-up into the exponent.
    # (No subnormals: whether a GPU flushes them is a compiler setting, not what this test is about.)
    x = torch.randn(5000) * torch.logspace(-30, 30, 5000)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8),
                            2 - 2**-9, 3.3895314e38])
    x = torch.cat([x, special]).to(KERNEL_DEVICE)
    y = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=KERNEL_DEVICE)
    _cast_to_bf16_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_nan_stays_nan():
    x = torch.tensor([float("nan"), -float("nan")] * 8, device=KERNEL_DEVICE)
    y = torch.zeros(x.shape, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    _cast_to_bf16_kernel[(1,)](x, y, x.numel(), BLOCK=16)
    assert torch.isnan(y).all()


@triton.jit
def _round_to_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, round_to_tf32(tl.load(x_ptr + offsets, mask=offsets < n)), mask=offsets < n)


def nearest_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round to 11 significant bits, ties away from zero, computed from the value (frexp) in float64."""
    mantissa, exponent = torch.frexp(x.double())
    scaled = mantissa * 2.0**11
    rounded = torch.where(torch.isfinite(x), torch.copysign(torch.floor(scaled.abs() + 0.5), scaled), scaled)
    return torch.ldexp(rounded / 2.0**11, exponent).float()


def test_fp32_rounds_to_nearest_tf32():
    # Normal magnitudes, signed zero, infinities, exact ties either side of zero, a value just below a tie, a
    # round-up into the next exponent and the largest float, which rounds up to infinity.
    x = torch.randn(5000) * torch.logspace(-30, 30, 5000)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11),
                            1 + 2**-11 - 2**-23, 2 - 2**-12, 3.4028235e38])
    x = torch.cat([x, special])
    want = nearest_tf32(x)
    assert want[-6:-1].tolist() == [1 + 2**-10, 1 + 2**-9, -(1 + 2**-10), 1.0, 2.0] and want[-1] == float("inf")
    x = x.to(KERNEL_DEVICE)
    y = torch.full(x.shape, float("nan"), device=KERNEL_DEVICE)
    _round_to_tf32_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.cpu().view(torch.int32), want.view(torch.int32))
