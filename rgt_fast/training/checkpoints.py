"""BasicSR's experiment layout and the files a training run writes into it.

``experiments/<name>/models/net_g_<iter>.pth`` holds {'params': ..., 'params_ema': ...} (``net_g_latest.pth`` a
copy of the newest); ``training_states/<iter>.state`` holds the rest of the run: iteration, epoch, optimizer,
schedule, RNG states. Every file is written to a temporary name in its folder, synced and renamed, so a run
killed mid-save leaves the previous checkpoint intact and never a truncated one.

The RNG states are stored as plain lists and tensors, so state files load with ``torch.load(weights_only=True)``
like the weights: no file this package reads can execute code.
"""
from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_destination

_STATE_NAME = re.compile(r"^(\d+)\.state$")


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

    def latest_state(self) -> Path | None:
        """The training state with the highest iteration, or None."""
        if not self.training_states.is_dir():
            return None
        found = [(int(m.group(1)), p) for p in self.training_states.iterdir() if (m := _STATE_NAME.match(p.name))]
        return max(found)[1] if found else None

    def archive_existing(self) -> Path | None:
        """Move a previous experiment of the same name aside (as BasicSR does) rather than mix files into it."""
        if not self.root.exists():
            return None
        archived = self.root.with_name(f"{self.root.name}_archived_{time.strftime('%Y%m%d_%H%M%S')}")
        self.root.rename(archived)
        return archived

    def create(self) -> None:
        for folder in (self.models, self.training_states):
            folder.mkdir(parents=True, exist_ok=True)


def net_file_of_state(state_path: Path, iteration: int) -> Path:
    """The weights saved with a training state: ``../models/net_g_<iter>.pth`` next to its folder."""
    return ExperimentPaths(state_path.resolve().parent.parent).net_file(iteration)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, flushed to disk before it replaces ``path``."""
    with atomic_destination(path) as temporary, open(temporary, "xb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_file(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


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
