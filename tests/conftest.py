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
