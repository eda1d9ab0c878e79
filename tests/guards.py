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
            assert written == 0, f"a kernel wrote {written} elements outside its {numel}-element buffer"


class RaceDetector:
    """Under the interpreter, records which program of a launch loads and stores each address. Programs of one
    launch run in no defined order on a GPU, so an address stored by two of them holds whichever came last, and
    one that a program stores and another loads may be read before or after the store: races that the
    interpreter, running programs one after another, would never show as a wrong value."""

    def __init__(self):
        self.accesses: dict[str, list[tuple[np.ndarray, int]]] = {"load": [], "store": []}
        self.races: list[str] = []

    def install(self, monkeypatch) -> None:
        from triton.runtime import interpreter

        detector = self
        builder_class = interpreter.InterpreterBuilder
        masked_load, masked_store = builder_class.create_masked_load, builder_class.create_masked_store
        run_launch = interpreter.GridExecutor.__call__

        def record(kind, builder, ptrs, mask):
            x, y, z = builder.grid_idx
            grid_x, grid_y, _ = builder.grid_dim
            accessed = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
            detector.accesses[kind].append((accessed.ravel(), x + grid_x * (y + grid_y * z)))

        def recording_masked_load(builder, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
            record("load", builder, ptrs, mask)
            return masked_load(builder, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

        def recording_masked_store(builder, ptrs, value, mask, cache_modifier, eviction_policy):
            record("store", builder, ptrs, mask)
            return masked_store(builder, ptrs, value, mask, cache_modifier, eviction_policy)

        def checked_launch(executor, *args, **kwargs):
            for accesses in detector.accesses.values():
                accesses.clear()
            result = run_launch(executor, *args, **kwargs)
            detector.check_launch(executor.fn.__name__)
            return result

        monkeypatch.setattr(builder_class, "create_masked_load", recording_masked_load)
        monkeypatch.setattr(builder_class, "create_masked_store", recording_masked_store)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", checked_launch)

    def _distinct_accesses(self, kind: str) -> np.ndarray:
        """(2, n) array of distinct (address, program) pairs of one kind, sorted by address."""
        accesses = self.accesses[kind]
        self.accesses[kind] = []
        if not accesses:
            return np.empty((2, 0), np.uint64)
        addresses = np.concatenate([accessed for accessed, _ in accesses])
        programs = np.concatenate([np.full(accessed.size, program, np.uint64) for accessed, program in accesses])
        return np.unique(np.stack([addresses, programs]), axis=1)

    def check_launch(self, kernel_name: str) -> None:
        stores = self._distinct_accesses("store")
        if stores.size == 0:
            self.accesses["load"] = []
            return
        stored, writers = np.unique(stores[0], return_counts=True)
        if (writers > 1).any():
            self.races.append(f"{kernel_name}: {int((writers > 1).sum())} addresses stored by more than one program "
                              f"(up to {int(writers.max())})")
        loads = self._distinct_accesses("load")
        loads = loads[:, np.isin(loads[0], stored)]
        if loads.size:
            writer = stores[1][np.searchsorted(stores[0], loads[0])]  # the first writer, where several race anyway
            crossed = loads[1] != writer
            if crossed.any():
                self.races.append(f"{kernel_name}: {int(np.unique(loads[0][crossed]).size)} addresses stored by one "
                                  f"program and loaded by another")

    def assert_no_races(self) -> None:
        assert not self.races, "racing accesses: " + "; ".join(self.races)
