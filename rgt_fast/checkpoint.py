"""Reading and writing RGT weights: BasicSR .pth files, bare state_dicts and safetensors."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from .config import ArchitectureMismatch, infer_hyperparameters
from .files import atomic_destination

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
Source = Union[str, os.PathLike, StateDict]

# Bytes that are no checkpoint fail torch.load in many ways: a text file's first byte reads as a pickle memo lookup
# (KeyError: 105 for "hi"), other files as index, struct or Unicode errors. To the user each means the same: not a
# readable checkpoint, which the callers say with the file's name.
UNREADABLE_FILE_ERRORS = (Exception,)

# Buffers that follow from the architecture alone: a file may leave them out (the built-in demo weights do, which
# keeps them small: a shifted block's two masks are 8 MB at split size [8, 32]). rpe_biases stays required: it
# records split_size.
DERIVED_BUFFERS = ("attn_mask_0", "attn_mask_1", "relative_position_index")

# Without a param_key: BasicSR keeps EMA weights under 'params_ema', and they are the ones to evaluate.
PARAM_KEYS = ("params_ema", "params", "state_dict", "model")


class CheckpointError(ValueError):
    """A weights file that cannot be read or does not hold an RGT; the message names the file."""


def _select_weights(obj: Mapping, origin: str, param_key: str | None) -> Any:
    """The entry of a checkpoint that holds the weights; ``obj`` itself when it is a bare state_dict."""
    if param_key is None:
        return next((obj[key] for key in PARAM_KEYS if isinstance(obj.get(key), Mapping)), obj)
    if isinstance(obj.get(param_key), Mapping):
        return obj[param_key]
    if isinstance(obj.get("params"), Mapping):
        # BasicSR's load_network falls back the same way, and EMA-less runs save 'params' alone.
        logger.info("%s has no %r weights; loading its 'params'", origin, param_key)
        return obj["params"]
    if any(isinstance(value, Mapping) for value in obj.values()):
        wanted = "'params'" if param_key == "params" else f"{param_key!r} (or 'params')"
        raise CheckpointError(f"{origin}: holds no {wanted} weights; choose one of its top-level keys "
                              f"{list(obj)[:8]} as the param key (path.param_key_g in option files)")
    return obj


def _unwrap(obj: Any, origin: str, param_key: str | None = None) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        obj = _select_weights(obj, origin, param_key)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{origin}: expected a state_dict (or a dict with 'params_ema'/'params'), "
                              f"got {type(obj).__name__}")
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  f"top-level keys are {list(obj)[:8]}")
        tensors[_without_wrapper_prefixes(key)] = value
    return tensors


# Prefixes that wrappers add to every key: DataParallel / DistributedDataParallel, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrapper_prefixes(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` names a safetensors file (by its suffix, in any case: Windows tools write .SAFETENSORS)."""
    return path.suffix.lower() == ".safetensors"


def read_state_dict(path: str | os.PathLike, *, param_key: str | None = None) -> dict[str, torch.Tensor]:
    """The RGT state_dict stored in ``path`` (.pth/.pt or .safetensors), with ``module.`` prefixes removed.

    From a BasicSR file, ``param_key`` picks the entry (its ``'params'`` when that entry is missing, as BasicSR's
    ``param_key_g`` does); None takes ``'params_ema'`` when present, else ``'params'``. A bare state_dict is read
    as it is. Pickled files are read with ``weights_only=True``: no code from a weights file is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if is_safetensors(path):
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_FILE_ERRORS as err:
        raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: {err}); the file may be "
                              f"truncated, corrupt, or not a PyTorch/safetensors checkpoint") from err
    return _unwrap(obj, str(path), param_key)


def save_state_dict(state_dict: StateDict, path: str | os.PathLike, *, key: str = "params") -> None:
    """Write weights atomically: BasicSR layout ({key: state_dict}) for .pth, flat tensors for .safetensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_destination(Path(path)) as temporary:
        if is_safetensors(Path(path)):
            from safetensors.torch import save_file
            save_file(tensors, str(temporary))
        else:
            torch.save({key: tensors}, temporary)


def add_derived_buffers(model: torch.nn.Module, state_dict: StateDict) -> dict[str, torch.Tensor]:
    """``state_dict`` completed with ``model``'s own copies of the DERIVED_BUFFERS it leaves out or holds in another
    shape: files this project wrote while img_size still sized the shift masks (img_size 32 in
    train/options/smoke_cpu.yml) load like official ones. Outputs do not depend on the masks' size."""
    derived = {k: v for k, v in model.state_dict().items()
               if k.endswith(DERIVED_BUFFERS) and (k not in state_dict or state_dict[k].shape != v.shape)}
    return {**state_dict, **derived}


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


def architecture_of(state_dict: StateDict, origin: str) -> dict[str, Any]:
    """The RGT keyword arguments ``state_dict`` describes (``infer_hyperparameters``); weights of another
    architecture raise a CheckpointError naming ``origin``, the file or "state_dict"."""
    try:
        return infer_hyperparameters(state_dict)
    except ArchitectureMismatch as err:
        raise CheckpointError(f"{origin}: {err} (keys start with {list(state_dict)[:5]})") from err


def load_model(source: Source, *, fused: bool = True, backend: str = "auto", device: Any = None,
               strict: bool = True, param_key: str | None = None) -> torch.nn.Module:
    """Build the RGT that ``source`` (a path or a state_dict) holds, load it strictly and return it in eval mode.

    Every hyperparameter is read back from the weights, as ``infer_hyperparameters`` says: those the weights cannot
    tell take the official values. So an odd ``num_heads``, which has the weights of the even count below it, comes
    back even (official checkpoints use even counts); convert such a model with ``rgt_fast.accelerate`` instead,
    which reads the count from the modules. ``fused=False`` returns ``rgt_fast.reference.RGT``.
    Buffers that the architecture determines (shift masks, relative position indices) may be absent.
    ``param_key`` picks the entry of a BasicSR file as in ``read_state_dict``.
    """
    from . import create_model_from_kwargs

    origin = "state_dict" if isinstance(source, Mapping) else str(source)
    state_dict = (_unwrap(source, origin, param_key) if isinstance(source, Mapping)
                  else read_state_dict(source, param_key=param_key))
    model = create_model_from_kwargs(architecture_of(state_dict, origin), fused=fused, backend=backend)
    state_dict = add_derived_buffers(model, state_dict)
    problems = describe_mismatch(model, state_dict)
    if problems and strict:
        raise CheckpointError(f"{origin}: weights do not match the RGT they describe ({problems})")
    model.load_state_dict(state_dict, strict=strict)
    model.eval()
    if device is not None:
        model.to(device)
    return model
