"""BasicSR's experiment layout and the files a training run writes into it.

``experiments/<name>/models/net_g_<iter>.pth`` holds {'params': ..., 'params_ema': ...} (``net_g_latest.pth`` a
copy of the newest); ``training_states/<iter>.state`` holds the rest of the run: iteration, epoch, optimizer,
schedule, and what BasicSR's states lack for an exact resume (seed, position in the epoch, RNG states, best
metrics). Every file is written to a temporary name in its folder, synced and renamed, so a run killed mid-save
leaves the previous checkpoint intact and never a truncated one.

The RNG states are stored as plain lists and tensors, so state files load with ``torch.load(weights_only=True)``
like the weights: no file this package reads can execute code.
"""
from __future__ import annotations

import itertools
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..checkpoint import UNREADABLE_FILE_ERRORS, CheckpointError
from ..files import atomic_destination

_STATE_NAME = re.compile(r"^(\d+)\.state$")
# Every training state, BasicSR's included, has these; BasicSR's have nothing else.
_STATE_KEYS = ("iter", "epoch", "optimizers", "schedulers")
_EXACT_RESUME_KEYS = ("seed", "samples_into_epoch", "rng", "best_metrics")


@dataclass(frozen=True)
class ExperimentPaths:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def training_states(self) -> Path:
        return self.root / "training_states"

    @property
    def visualization(self) -> Path:
        return self.root / "visualization"

    def net_file(self, iteration: int | str) -> Path:
        return self.models / f"net_g_{iteration}.pth"

    def state_file(self, iteration: int) -> Path:
        return self.training_states / f"{iteration}.state"

    def states_newest_first(self) -> list[Path]:
        """The training states, highest iteration first."""
        if not self.training_states.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.training_states.iterdir() if (m := _STATE_NAME.match(p.name))]
        return [path for _, path in sorted(found, reverse=True)]

    def create(self) -> None:
        for folder in (self.models, self.training_states):
            folder.mkdir(parents=True, exist_ok=True)


def archive_existing(folder: Path) -> Path | None:
    """Move the folder of a previous run of the same name aside (as BasicSR does) rather than mix files into it:
    where it went, or None when there was none."""
    if not folder.exists():
        return None
    stamped = folder.with_name(f"{folder.name}_archived_{time.strftime('%Y%m%d_%H%M%S')}")
    archived = stamped
    for repeat in itertools.count(2):  # runs started within a second of each other
        if not archived.exists():
            break
        archived = stamped.with_name(f"{stamped.name}.{repeat}")
    folder.rename(archived)
    return archived


def net_file_of_state(state_path: Path, iteration: int) -> Path:
    """The weights saved with a training state: ``../models/net_g_<iter>.pth`` next to its folder."""
    return ExperimentPaths(state_path.resolve().parent.parent).net_file(iteration)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, flushed to disk before it replaces ``path``; then the folder's entry,
    so that after a power loss ``path`` is the new file or the old one."""
    with atomic_destination(path) as temporary, open(temporary, "xb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if hasattr(os, "O_DIRECTORY"):  # POSIX; Windows cannot open a folder to sync it
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load_file(path: Path) -> Any:
    """A file of a training run (weights or state); CheckpointError naming it when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_FILE_ERRORS as err:
        raise CheckpointError(f"{path}: cannot read it ({type(err).__name__}: {err}); the file may be missing, "
                              f"truncated or corrupt") from err


def load_training_state(path: Path) -> dict[str, Any]:
    """A ``.state`` file written by this package or by BasicSR; CheckpointError naming anything else."""
    state = load_file(path)
    missing = [key for key in _STATE_KEYS if not (isinstance(state, Mapping) and key in state)]
    if missing:
        raise CheckpointError(f"{path}: not a training state (no {', '.join(missing)}); resume from a .state file "
                              f"in experiments/<name>/training_states")
    return state


def resumes_exactly(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` records where in the epoch and in the random streams the run stopped (BasicSR's do not)."""
    return all(key in state for key in _EXACT_RESUME_KEYS)


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
