"""spandrel's copy of the official RGT, loaded as an independent oracle for the reference.

spandrel's package __init__ imports every architecture it supports, some of which need torchvision (which
does not import beside the CPU torch wheel). The RGT file itself only needs ``spandrel.util``, so the package
is registered without running its __init__ and the architecture file is loaded on its own.
"""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path


@functools.lru_cache(maxsize=None)
def load_official_rgt_class():
    """The RGT class of spandrel's architecture file, or None when spandrel or einops is not installed."""
    spec = importlib.util.find_spec("spandrel")
    if spec is None or importlib.util.find_spec("einops") is None:
        return None
    root = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("spandrel")
    package.__path__ = [str(root)]
    package.__spec__ = importlib.machinery.ModuleSpec("spandrel", None, is_package=True)
    sys.modules["spandrel"] = package
    arch_spec = importlib.util.spec_from_file_location(
        "official_rgt_oracle", root / "architectures" / "RGT" / "__arch" / "rgt.py")
    module = importlib.util.module_from_spec(arch_spec)
    arch_spec.loader.exec_module(module)
    return module.RGT
