"""Kernels reading inputs whose element offsets pass 2**31, as whole-image inference of large images does (a
2048x2048 map's qkv holds 2.3e9 elements): offsets computed in int32 would wrap there.

The inputs are views into storage of about 4 GB that is allocated but never touched except where the view's
elements lie, so the operating system backs only those pages. Outputs and gradients must equal those of
contiguous copies of the same values, bit for bit.
"""
import importlib
import pytest
import torch
from kernel_device import KERNEL_DEVICE

add_layer_norm, lsa_attention, rgsa_attention, spatial_gate = (
    importlib.import_module(f"rgt_fast.kernels.{name}")
    for name in ("add_layer_norm", "lsa_attention", "rgsa_attention", "spatial_gate"))

PAST_INT32 = 2**31
# Unwritten elements, stores outside a buffer and accesses racing between programs show up (conftest).
pytestmark = pytest.mark.usefixtures("kernel_memory_checks")


def lazily_allocated(size: int, dtype: torch.dtype) -> torch.Tensor:
    try:
        return torch.empty(size, dtype=dtype, device=KERNEL_DEVICE)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"this machine refused {size * dtype.itemsize / 2**30:.1f} GiB of address space (untouched, "
                    f"it would cost no memory): {err}")


def far_apart(values: torch.Tensor, dim: int) -> torch.Tensor:
    """A leaf view equal to ``values`` whose last index along ``dim`` lies past 2**31 elements from its first,
    in storage allocated lazily. ``dim`` is innermost but one in memory (the last dim is contiguous) or, for the
    last dim of a (1, N, C) tensor, outermost: a channel-major view whose channel stride passes 2**31 / C."""
    steps = max(values.shape[dim] - 1, 1)
    far_stride = -(-(PAST_INT32 // steps + 1) // 64) * 64  # 128-byte aligned rows in 16-bit
    strides = list(torch.empty(values.shape, device="meta").stride())
    if dim == values.dim() - 1:
        assert values.shape[0] == 1 and values.dim() == 3
        strides = [0, 1, far_stride]
    else:
        strides[dim] = far_stride
        for d in range(dim - 1, -1, -1):
            strides[d] = strides[d + 1] * values.shape[d + 1]
    size = sum((n - 1) * stride for n, stride in zip(values.shape, strides)) + 1
    view = lazily_allocated(size, values.dtype).as_strided(values.shape, strides)
    assert (values.shape[dim] - 1) * strides[dim] >= PAST_INT32
    with torch.no_grad():
        view.copy_(values)
    return view.requires_grad_()


def outputs_and_grads(fn, inputs: list[torch.Tensor], upstream: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = fn(*inputs)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    torch.autograd.backward(outputs, upstream)
    return [out.detach() for out in outputs] + [t.grad for t in inputs]


def assert_same_on_far_apart_inputs(fn, values: list[torch.Tensor], far_dims: list, upstream: list[torch.Tensor]):
    """``fn`` on far-apart views (where ``far_dims`` names a dim) and on contiguous leaves, bitwise equal."""
    contiguous = [v.clone().requires_grad_() for v in values]
    far = [far_apart(v, dim) if dim is not None else v.clone().requires_grad_() for v, dim in zip(values, far_dims)]
    for got, want in zip(outputs_and_grads(fn, far, upstream), outputs_and_grads(fn, contiguous, upstream)):
        assert torch.equal(got, want)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, device=KERNEL_DEVICE).to(torch.float16)


@pytest.mark.parametrize("far_dim", [0, 1], ids=["batch", "tokens"])
def test_rgsa_attention(far_dim):
    batch = 2 if far_dim == 0 else 1
    q, k, v = randn(batch, 40, 2, 15), randn(batch, 9, 2, 15), randn(batch, 9, 2, 30)
    assert_same_on_far_apart_inputs(lambda q, k, v: rgsa_attention.rgsa_attention(q, k, v, 0.25), [q, k, v],
                                    [far_dim, far_dim, far_dim], [randn(batch, 40, 2, 30)])


def test_lsa_attention_tokens():
    H, W, dim = 9, 30, 64
    tables = [torch.randn(15 * 63, 1, device=KERNEL_DEVICE) for _ in range(2)]

    def attend(qkv):
        return lsa_attention.lsa_attention(qkv, H, W, 2, [8, 32], True, *tables, dim ** -0.5)

    assert_same_on_far_apart_inputs(attend, [randn(1, H * W, 3 * dim)], [1], [randn(1, H * W, dim)])


@pytest.mark.parametrize("far_dim", [1, 2], ids=["tokens", "channel-major"])
def test_spatial_gate(far_dim):
    H, W, channels = 5, 9, 20
    params = [1 + 0.3 * torch.randn(channels), 0.3 * torch.randn(channels), 0.3 * torch.randn(channels, 1, 3, 3),
              0.3 * torch.randn(channels)]
    params = [p.to(KERNEL_DEVICE) for p in params]
    assert_same_on_far_apart_inputs(lambda hidden: spatial_gate.spatial_gate(hidden, H, W, *params),
                                    [randn(1, H * W, 2 * channels)], [far_dim], [randn(1, H * W, channels)])


@pytest.mark.parametrize("far_dim", [1, 2], ids=["tokens", "channel-major"])
def test_add_layer_norm(far_dim):
    weight, bias = (torch.randn(48, device=KERNEL_DEVICE) for _ in range(2))
    assert_same_on_far_apart_inputs(lambda x, delta: add_layer_norm.add_layer_norm(x, delta, weight, bias),
                                    [randn(1, 37, 48), randn(1, 37, 48)], [far_dim, None],
                                    [randn(1, 37, 48), randn(1, 37, 48)])
