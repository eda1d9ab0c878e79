"""Peak memory of CPU code, counted from op results: the bytes of their storages while they live (workspaces an
op allocates and frees inside itself are not seen)."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """Within the mode, the most bytes held at once by the storages of op results: each storage once, however many
    views of it live; a tensor from before the mode counts from its first view made within. Unlike a process's
    resident set, no allocator state or other thread disturbs the count."""

    def __init__(self, ignored=()):
        """``ignored``: tensors (parameters, inputs) whose storages are never counted, views of them included."""
        super().__init__()
        self.ignored = {t.untyped_storage().data_ptr() for t in ignored}
        self.live = {}  # storage address -> [tensors alive on it, bytes]
        self.current = 0
        self.peak = 0

    def _release(self, address):
        entry = self.live[address]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if address == 0 or address in self.ignored:
                continue
            if address in self.live:
                self.live[address][0] += 1
            else:
                self.live[address] = [1, storage.nbytes()]
                self.current += storage.nbytes()
            weakref.finalize(t, self._release, address)
        self.peak = max(self.peak, self.current)
        return out
