"""glibc's malloc settings for CPU inference: keep freed feature maps for reuse instead of handing them back.

With glibc's defaults, a block above the mmap threshold (128 KiB, raised as such blocks are freed up to 32 MiB; a
256x256 feature map of 180 float32 channels is 47 MiB) is mapped from the system when allocated and unmapped when
freed, and freed memory at the top of the heap is returned to the system. Layers then pay page faults on fresh
zeroed pages for their outputs. On the 2-core development machine that made an RGT-S x4 forward at 256x256 take
19.1 s instead of 9.1 s, and at 128x128 2.9 s instead of 2.1 s. Retaining costs memory: the 256x256 peak was
1166 MB instead of 690 MB (``benchmarks/results/cpu-2026-11-27-256x256*.json``).
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameter numbers in glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
RETAINED_BLOCK_BYTES = 1 << 30
USER_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def retain_freed_cpu_memory() -> bool:
    """Make glibc's malloc serve blocks up to 1 GiB from its heap and keep up to 1 GiB of freed memory there.

    Large tensors freed by one layer are then reused by the next without page faults. The cost is that the process
    keeps its peak CPU memory until it exits, so call this in programs that run the model on CPU (``rgt-fast
    upscale`` and ``rgt-fast eval`` do), not in a long-lived process that must shrink after a burst. The setting is
    process-wide and cannot be undone. Returns whether it was applied: not with another C library, and not when
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set in the environment, since the user chose then.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_ALLOCATOR_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    accepted = [libc.mallopt(parameter, RETAINED_BLOCK_BYTES) for parameter in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)]
    return all(accepted)
