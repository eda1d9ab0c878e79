"""Where training and evaluation messages go: the console (set up by entry points) and a run's log file."""
from __future__ import annotations

import logging
from pathlib import Path

PACKAGE_LOGGER = logging.getLogger("rgt_fast")
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
_console: logging.Handler | None = None


def configure_console_logging(rank: int = 0) -> None:
    """Progress on the console from rank 0; other ranks print warnings only, so a problem on any rank shows."""
    global _console
    PACKAGE_LOGGER.setLevel(logging.INFO)
    if _console is None:
        _console = logging.StreamHandler()
        _console.setFormatter(_FORMAT)
        PACKAGE_LOGGER.addHandler(_console)
    _console.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def attach_log_file(path: Path) -> logging.Handler:
    """Messages from INFO up, from every module of the package (data warnings included), appended to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(_FORMAT)
    handler.setLevel(logging.INFO)
    if PACKAGE_LOGGER.getEffectiveLevel() > logging.INFO:
        PACKAGE_LOGGER.setLevel(logging.INFO)
    PACKAGE_LOGGER.addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    PACKAGE_LOGGER.removeHandler(handler)
    handler.close()
