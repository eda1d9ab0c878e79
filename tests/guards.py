"""NaN guards around what kernels read and write, so that out-of-bounds access shows up in CPU tests too.

Under the interpreter a kernel's loads and stores are raw memory accesses, as on a GPU: an unmasked read past a
row or a tensor's end returns whatever lies there, and a stray store overwrites it. Surrounding inputs and
buffers with NaN turns the first into NaN in the result and the second into a guard band that is no longer NaN.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _margin(size: int) -> int:
    """Reach of a tile rounded up to a power of two past ``size`` elements, plus one."""
    return (1 << max(size - 1, 0).bit_length()) - size + 1


def nan_surrounded(values: torch.Tensor, memory_order: tuple[int, ...] | None = None, step: int = 1) -> torch.Tensor:
    """``values`` as a view into a NaN-filled storage, differentiably (gradients flow back to ``values``).

    Every dim has NaN margins on both sides, wide enough to catch a power-of-two tile running past it, so rows are
    not adjacent in memory. ``memory_order`` lists dims outermost first (default: the order of ``values``'
    strides); the innermost one is spaced ``step`` elements apart, with NaN between.
    """
    if memory_order is None:
        memory_order = tuple(sorted(range(values.dim()), key=lambda d: values.stride(d), reverse=True))
    margins = [_margin(size) for size in values.shape]
    spacings = [step if d == memory_order[-1] else 1 for d in range(values.dim())]
    extents = [values.shape[d] * spacings[d] + 2 * margins[d] for d in memory_order]
    storage = torch.full(extents, float("nan"), dtype=values.dtype, device=values.device)
    padded = storage.permute([memory_order.index(d) for d in range(values.dim())])
    interior = padded[tuple(slice(margin, margin + size * spacing, spacing)
                            for margin, size, spacing in zip(margins, values.shape, spacings))]
    interior.copy_(values)
    return interior


class GuardedBuffers:
    """Stands in for ``rgt_fast.kernels._common.kernel_buffer``: each buffer is NaN (an element a kernel leaves
    unwritten stays NaN) and lies between NaN guard bands, which ``assert_guards_intact`` checks."""

    def __init__(self):
        self.allocations: list[tuple[torch.Tensor, int, int]] = []

    def __call__(self, shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        # At least a large tile's reach, and a multiple of 64 elements: the buffer stays 16-byte aligned.
        guard = -(-max(4096, numel) // 64) * 64
        storage = torch.full((2 * guard + numel,), float("nan"), dtype=dtype, device=device)
        self.allocations.append((storage, guard, numel))
        return storage[guard:guard + numel].view(shape)

    def assert_guards_intact(self) -> None:
        for storage, guard, numel in self.allocations:
            before, after = storage[:guard], storage[guard + numel:]
            written = int((~torch.isnan(before)).sum()) + int((~torch.isnan(after)).sum())
            assert written == 0, (f"a kernel wrote {written} elements outside its {tuple(storage.shape)[0] - 2 * guard}"
                                  f"-element buffer")


class StoreRaceDetector:
    """Under the interpreter, records which program of a launch stores to each address. Programs of one launch
    run in no defined order on a GPU, so an address stored by two of them holds whichever came last: a race that
    the interpreter, running programs one after another, would never show as a wrong value."""

    def __init__(self):
        self.stores: list[tuple[np.ndarray, int]] = []
        self.races: list[str] = []

    def install(self, monkeypatch) -> None:
        from triton.runtime import interpreter

        detector = self
        masked_store = interpreter.InterpreterBuilder.create_masked_store
        run_launch = interpreter.GridExecutor.__call__

        def recording_masked_store(builder, ptrs, value, mask, cache_modifier, eviction_policy):
            x, y, z = builder.grid_idx
            grid_x, grid_y, _ = builder.grid_dim
            stored = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
            detector.stores.append((stored.ravel(), x + grid_x * (y + grid_y * z)))
            return masked_store(builder, ptrs, value, mask, cache_modifier, eviction_policy)

        def checked_launch(executor, *args, **kwargs):
            detector.stores.clear()
            result = run_launch(executor, *args, **kwargs)
            detector.check_launch(executor.fn.__name__)
            return result

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", recording_masked_store)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", checked_launch)

    def check_launch(self, kernel_name: str) -> None:
        if not self.stores:
            return
        addresses = np.concatenate([stored for stored, _ in self.stores])
        programs = np.concatenate([np.full(stored.size, program, np.uint64) for stored, program in self.stores])
        self.stores.clear()
        address_of_each_writer = np.unique(np.stack([addresses, programs]), axis=1)[0]
        shared, writers = np.unique(address_of_each_writer, return_counts=True)
        if (writers > 1).any():
            self.races.append(f"{kernel_name}: {int((writers > 1).sum())} addresses stored by more than one program "
                              f"(up to {int(writers.max())})")

    def assert_no_races(self) -> None:
        assert not self.races, "racing stores: " + "; ".join(self.races)
