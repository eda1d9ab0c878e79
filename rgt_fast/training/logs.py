"""Where training and evaluation messages go: the console (set up by entry points) and a run's log file."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

PACKAGE_LOGGER = logging.getLogger("rgt_fast")
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
_console: logging.Handler | None = None


class _HeldRecords(logging.Handler):
    """Keeps what is logged until the run's log file exists."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_held: _HeldRecords | None = None


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a message comes, not as it was when logging was set up: a caller that
    redirects stderr later (a notebook cell, pytest's capture) still gets the messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_console_logging(rank: int = 0) -> None:
    """Progress on the console from rank 0; other ranks print warnings only, so a problem on any rank shows."""
    global _console
    PACKAGE_LOGGER.setLevel(logging.INFO)
    if _console is None:
        _console = _StderrHandler()
        _console.setFormatter(_FORMAT)
        PACKAGE_LOGGER.addHandler(_console)
    _console.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _log_info_records() -> None:
    """Let the package's INFO records be made (a library user's logging may leave the level at WARNING), for the
    log file; the console handler, when there is one, keeps its own level."""
    if PACKAGE_LOGGER.getEffectiveLevel() > logging.INFO:
        PACKAGE_LOGGER.setLevel(logging.INFO)


@contextlib.contextmanager
def hold_records_for_log_file() -> Iterator[None]:
    """Inside, messages are kept for the log file that ``attach_log_file`` opens, and written into it first.

    A run's log file is named from its options, so what is logged while reading them (unknown options) and while
    choosing the device and the state to resume comes before the file exists. Nested inside another, it keeps
    holding for the outer one.
    """
    global _held
    if _held is not None:
        yield
        return
    _held = _HeldRecords()
    _log_info_records()
    PACKAGE_LOGGER.addHandler(_held)
    try:
        yield
    finally:
        PACKAGE_LOGGER.removeHandler(_held)
        _held = None


def attach_log_file(path: Path) -> logging.Handler:
    """Messages from INFO up, from every module of the package (data warnings included), appended to ``path``."""
    global _held
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(_FORMAT)
    handler.setLevel(logging.INFO)
    _log_info_records()
    if _held is not None:
        PACKAGE_LOGGER.removeHandler(_held)
        for record in _held.records:
            handler.handle(record)
        _held = None
    PACKAGE_LOGGER.addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    PACKAGE_LOGGER.removeHandler(handler)
    handler.close()
