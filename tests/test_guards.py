"""The memory checks the kernel tests rely on (guards.py) catch what they are for, on small Triton kernels."""
import pytest
import torch
import triton
import triton.language as tl
from guards import GuardedBuffers, RaceDetector, nan_surrounded
from kernel_device import KERNEL_DEVICE

from rgt_fast.kernels._common import INTERPRET


@triton.jit
def _store_block(out_ptr, n, BLOCK: tl.constexpr, OVERLAP: tl.constexpr, PAST_END: tl.constexpr):
    start = tl.program_id(0) * (BLOCK - OVERLAP)
    offsets = start + tl.arange(0, BLOCK)
    limit = n + PAST_END
    tl.store(out_ptr + offsets, offsets.to(tl.float32), mask=offsets < limit)


@triton.jit
def _store_then_copy_block(buffer_ptr, copy_ptr, n, BLOCK: tl.constexpr, READ_SHIFT: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(buffer_ptr + offsets, offsets.to(tl.float32), mask=offsets < n)
    read = offsets + READ_SHIFT
    tl.store(copy_ptr + offsets, tl.load(buffer_ptr + read, mask=read < n, other=0.0), mask=offsets < n)


def launch(out: torch.Tensor, overlap: int = 0, past_end: int = 0) -> None:
    block = 16
    _store_block[(triton.cdiv(out.numel(), block - overlap),)](out, out.numel(), BLOCK=block, OVERLAP=overlap,
                                                               PAST_END=past_end)


needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="the store-race detector hooks Triton's interpreter")


@needs_interpreter
@pytest.mark.parametrize("overlap,races", [(0, False), (3, True)])
def test_race_detector_flags_programs_storing_to_one_address(monkeypatch, overlap, races):
    detector = RaceDetector()
    detector.install(monkeypatch)
    out = torch.empty(50, device=KERNEL_DEVICE)
    launch(out, overlap=overlap)
    assert torch.equal(out, torch.arange(50, dtype=torch.float32))  # the values alone cannot tell
    assert bool(detector.races) == races
    if races:
        assert "_store_block" in detector.races[0] and "stored by more than one program" in detector.races[0]
        with pytest.raises(AssertionError, match="racing accesses"):
            detector.assert_no_races()


@needs_interpreter
@pytest.mark.parametrize("read_shift,races", [(0, False), (16, True)])
def test_race_detector_flags_a_load_of_what_another_program_stores(monkeypatch, read_shift, races):
    """Reading its own stores is ordered within a program; reading the next program's is not."""
    detector = RaceDetector()
    detector.install(monkeypatch)
    buffer, copy = (torch.empty(50, device=KERNEL_DEVICE) for _ in range(2))
    _store_then_copy_block[(triton.cdiv(50, 16),)](buffer, copy, 50, BLOCK=16, READ_SHIFT=read_shift)
    assert bool(detector.races) == races
    if races:
        assert "stored by one program and loaded by another" in detector.races[0]


@pytest.mark.parametrize("past_end", [0, 1])
def test_guarded_buffers_catch_a_store_past_the_end(past_end):
    buffers = GuardedBuffers()
    out = buffers((5, 10), dtype=torch.float32, device=KERNEL_DEVICE)
    assert torch.isnan(out).all() and out.is_contiguous() and out.data_ptr() % 16 == 0
    launch(out, past_end=past_end)
    if past_end:
        with pytest.raises(AssertionError, match="wrote 1 elements outside"):
            buffers.assert_guards_intact()
    else:
        buffers.assert_guards_intact()


@pytest.mark.parametrize("memory_order,step", [(None, 1), ((0, 2, 1), 1), (None, 2)])
def test_nan_surrounded_is_an_equal_differentiable_view_among_nans(memory_order, step):
    values = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    view = nan_surrounded(values, memory_order, step)
    assert torch.equal(view, values) and not view.is_contiguous()
    order = memory_order or (0, 1, 2)
    assert [view.stride(d) for d in order] == sorted(view.stride(), reverse=True)
    assert view.stride(order[-1]) == step
    storage = torch.tensor([], dtype=view.dtype).set_(view.untyped_storage())
    assert torch.isnan(storage).sum() == storage.numel() - values.numel()
    weights = torch.randn_like(values)
    (view * weights).sum().backward()
    assert torch.equal(values.grad, weights)
