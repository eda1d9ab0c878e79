"""Reading and writing RGT weights: BasicSR .pth files, bare state_dicts and safetensors."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from .config import ArchitectureMismatch, infer_hyperparameters
from .files import atomic_destination

StateDict = Mapping[str, torch.Tensor]
Source = Union[str, os.PathLike, StateDict]

# Buffers that follow from the architecture alone: a file may leave them out (the built-in demo weights do, which
# keeps them small: two shift masks are 8 MB at img_size 64). rpe_biases stays required: it records split_size.
DERIVED_BUFFERS = ("attn_mask_0", "attn_mask_1", "relative_position_index")

# BasicSR keeps EMA weights under 'params_ema' and prefers them for evaluation.
PARAM_KEYS = ("params_ema", "params", "state_dict", "model")


class CheckpointError(ValueError):
    """A weights file that cannot be read or does not hold an RGT; the message names the file."""


def _unwrap(obj: Any, origin: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in PARAM_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{origin}: expected a state_dict (or a dict with 'params_ema'/'params'), "
                              f"got {type(obj).__name__}")
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  f"top-level keys are {list(obj)[:8]}")
        tensors[key[len("module."):] if key.startswith("module.") else key] = value
    return tensors


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The RGT state_dict stored in ``path`` (.pth/.pt or .safetensors), with ``module.`` prefixes removed.

    Pickled files are read with ``weights_only=True``: no code from a weights file is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: {err}); the file may be "
                              f"truncated, corrupt, or not a PyTorch/safetensors checkpoint") from err
    return _unwrap(obj, str(path))


def save_state_dict(state_dict: StateDict, path: str | os.PathLike, *, key: str = "params") -> None:
    """Write weights atomically: BasicSR layout ({key: state_dict}) for .pth, flat tensors for .safetensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_destination(Path(path)) as temporary:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(temporary))
        else:
            torch.save({key: tensors}, temporary)


def describe_mismatch(model: torch.nn.Module, state_dict: StateDict, limit: int = 5) -> str:
    """The first missing / unexpected keys and shape mismatches between ``model`` and ``state_dict``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {items[:limit]}{more}")
    return "; ".join(parts)


def load_model(source: Source, *, fused: bool = True, backend: str = "auto", device: Any = None,
               strict: bool = True) -> torch.nn.Module:
    """Build the RGT that ``source`` (a path or a state_dict) holds, load it strictly and return it in eval mode.

    Every hyperparameter is read back from the weights. ``fused=False`` returns ``rgt_fast.reference.RGT``.
    Buffers that the architecture determines (shift masks, relative position indices) may be absent.
    """
    from . import create_model_from_kwargs

    origin = "state_dict" if isinstance(source, Mapping) else str(source)
    state_dict = _unwrap(source, origin) if isinstance(source, Mapping) else read_state_dict(source)
    try:
        kwargs = infer_hyperparameters(state_dict)
    except ArchitectureMismatch as err:
        raise CheckpointError(f"{origin}: {err} (keys start with {list(state_dict)[:5]})") from err
    model = create_model_from_kwargs(kwargs, fused=fused, backend=backend)
    derived = {k: v for k, v in model.state_dict().items() if k.endswith(DERIVED_BUFFERS) and k not in state_dict}
    state_dict = {**state_dict, **derived}
    problems = describe_mismatch(model, state_dict)
    if problems and strict:
        raise CheckpointError(f"{origin}: weights do not match the RGT they describe ({problems})")
    model.load_state_dict(state_dict, strict=strict)
    model.eval()
    if device is not None:
        model.to(device)
    return model
