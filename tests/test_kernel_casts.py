"""fp32 -> bf16 casts inside kernels round to nearest even, as PyTorch's do (the interpreter truncated them)."""
import torch
import triton
import triton.language as tl

from kernel_device import KERNEL_DEVICE


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
