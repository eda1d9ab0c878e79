import importlib
import os

# Kernels run in Triton's interpreter on CPU tensors; the variable must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """Run a test on one CPU thread (bitwise-reproducible reductions, no contention for tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_memory_checks(monkeypatch):
    """Every buffer a kernel fills starts as NaN between NaN guard bands (guards.GuardedBuffers), which must still
    be NaN after the test; under the interpreter, no address may be stored by one program of a launch and
    stored or loaded by another (guards.RaceDetector)."""
    from guards import GuardedBuffers, RaceDetector

    from rgt_fast.kernels import _common

    buffers = GuardedBuffers()
    monkeypatch.setattr(_common, "kernel_buffer", buffers)
    races = RaceDetector()
    if _common.INTERPRET:
        races.install(monkeypatch)
    yield
    buffers.assert_guards_intact()
    races.assert_no_races()


@pytest.fixture
def whole_window_tiles(monkeypatch):
    """The L-SA kernels take one tile per window under the interpreter, whose cost is per tile operation
    whatever the tile's size.

    Compiled, such a tile (256 x 256 fp32 scores over 128 threads) spills tens of KB per thread, and ptxas took
    15-50 s per kernel for sm_90a, some 15 minutes over these tests: on a GPU they run the shipped tiles instead.
    """
    from kernel_device import KERNEL_DEVICE

    lsa = importlib.import_module("rgt_fast.kernels.lsa_attention")

    if KERNEL_DEVICE != "cpu":
        return
    window_tokens = 8 * 32  # the official split size, (8, 32)
    window_tile = (window_tokens, window_tokens, 4, 2)
    monkeypatch.setattr(lsa, "_CONFIGS", {kernel: {dot_class: window_tile for dot_class in classes}
                                          for kernel, classes in lsa._CONFIGS.items()})


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs, so that the slices are even
def pytest_collection_modifyitems(config, items):
    """RGT_FAST_TEST_SHARD=K/N keeps the K-th of N contiguous slices of the collected tests (K from 1), so that a
    GPU run can spread one file over several processes. Contiguous, because neighbouring tests share compiled
    kernel variants, which a process then compiles once."""
    shard = os.environ.get("RGT_FAST_TEST_SHARD")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    if not 1 <= index <= count:
        raise pytest.UsageError(f"RGT_FAST_TEST_SHARD={shard}: expected K/N with 1 <= K <= N")
    start, stop = (len(items) * (index - 1)) // count, (len(items) * index) // count
    config.hook.pytest_deselected(items=items[:start] + items[stop:])
    items[:] = items[start:stop]
