"""rgt-fast: a fused, checkpoint-exact RGT for image super-resolution."""
from __future__ import annotations

from typing import Any

from . import reference
from .checkpoint import CheckpointError, load_model, read_state_dict, save_state_dict
from .config import PRESETS, infer_hyperparameters, preset_kwargs
from .cpu_allocator import retain_freed_cpu_memory
from .inference import upscale
from .matlab_resize import imresize
from .model import RGT, accelerate, check_backend

__version__ = "0.1.0"
__all__ = ["RGT", "accelerate", "create_model", "create_model_from_kwargs", "load_model", "upscale", "imresize",
           "read_state_dict", "save_state_dict", "infer_hyperparameters", "preset_kwargs", "CheckpointError",
           "PRESETS", "reference", "retain_freed_cpu_memory"]


def create_model_from_kwargs(kwargs: dict[str, Any], *, fused: bool = True, backend: str = "auto") -> reference.RGT:
    """An RGT built from official constructor arguments: the fused model, or the reference with fused=False."""
    check_backend(backend)
    if fused:
        return RGT(**kwargs, backend=backend)
    if backend != "auto":
        raise ValueError(f"backend={backend!r} selects the fused model's kernels; the reference (fused=False) has "
                         f"none: leave backend out, or pass fused=True")
    return reference.RGT(**kwargs)


def create_model(name: str, upscale: int, *, fused: bool = True, backend: str = "auto",
                 **overrides: Any) -> reference.RGT:
    """A freshly initialised preset ("RGT" or "RGT-S") for ``upscale`` in {1, 2, 3, 4, ...}."""
    return create_model_from_kwargs(preset_kwargs(name, upscale, **overrides), fused=fused, backend=backend)
