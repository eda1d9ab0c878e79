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
    """The nearest TF32 value, ties away from zero, computed from the value in float64: 11 significant bits for
    normal numbers, and below 2**-126 the subnormal grid of spacing 2**-136 (fp32's exponent range, 10 bits)."""
    _, exponent = torch.frexp(x.double())
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.clamp(exponent, min=-125) - 11)
    scaled = x.double() / spacing
    rounded = torch.where(torch.isfinite(x), torch.copysign(torch.floor(scaled.abs() + 0.5), scaled), scaled)
    return (rounded * spacing).float()


def round_in_kernel(x: torch.Tensor) -> torch.Tensor:
    x = x.to(KERNEL_DEVICE)
    y = torch.full(x.shape, float("nan"), device=KERNEL_DEVICE)
    _round_to_tf32_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y.cpu()


def test_fp32_rounds_to_nearest_tf32():
    # Normal magnitudes, signed zero, infinities, exact ties either side of zero, a value just below a tie, a
    # round-up into the next exponent, the largest float (which rounds up to infinity) and subnormals, whose
    # TF32 grid is coarser than their fp32 one.
    x = torch.randn(5000) * torch.logspace(-30, 30, 5000)
    subnormal_bits = torch.tensor([0x1, 0xFFF, 0x1000, 0x1001, 0x3000, 0x7FEFFF, 0x7FF000], dtype=torch.int32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11),
                            1 + 2**-11 - 2**-23, 2 - 2**-12, 3.4028235e38])
    x = torch.cat([x, subnormal_bits.view(torch.float32), -subnormal_bits.view(torch.float32), special])
    want = nearest_tf32(x)
    assert want[-6:-1].tolist() == [1 + 2**-10, 1 + 2**-9, -(1 + 2**-10), 1.0, 2.0] and want[-1] == float("inf")
    assert want[5000:5007].view(torch.int32).tolist() == [0, 0, 0x2000, 0x2000, 0x4000, 0x7FE000, 0x800000]
    assert torch.equal(round_in_kernel(x).view(torch.int32), want.view(torch.int32))


def test_nans_stay_nans_through_tf32_rounding():
    """Whatever their payload: CUDA's canonical NaN (0x7FFFFFFF, what inf - inf gives on a GPU) and its negative
    would carry into the sign bit and come out as zeros, and one with only low payload bits as infinity."""
    nan_bits = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000, 0x7FBFFFFF, -0x7FFFF], dtype=torch.int32)
    assert torch.isnan(round_in_kernel(nan_bits.view(torch.float32))).all()
