"""Image reading and atomic file writing shared by upscaling, evaluation, training and checkpoints."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np


# Read once at import: os.umask can only be read by setting it, which is not safe once threads run.
_UMASK = os.umask(0)
os.umask(_UMASK)


class UnusableImage(ValueError):
    """An image that cannot be read or does not fit its pair; ``path`` names it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def read_image(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """``path`` decoded as ``cv2.imread(path, flags)`` would, raising UnusableImage with the reason instead of None.

    Read through numpy so that an unreadable file says why, and so that non-ASCII paths work on Windows.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise UnusableImage(path, f"cannot be read ({err.strerror or err})") from err
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as err:
        raise UnusableImage(path, f"cannot be decoded as an image ({err})") from err
    if image is None:
        raise UnusableImage(path, "cannot be decoded as an image (corrupt, truncated or empty file?)")
    return image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of ``image``; float images (which PNG cannot hold) become 16-bit."""
    if image.dtype == np.float32:
        image = (np.clip(image, 0.0, 1.0) * 65535.0).round().astype(np.uint16)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cannot be encoded as PNG (shape {image.shape}, {image.dtype})")
    return encoded.tobytes()


@contextlib.contextmanager
def atomic_destination(destination: Path) -> Iterator[Path]:
    """A hidden temporary path beside ``destination`` that replaces it once the block succeeds.

    An interrupted write leaves ``destination`` as it was. The result gets the usual mode for new files (some
    writers, like tempfile.mkstemp or safetensors, create theirs 0600).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(data: bytes, destination: Path) -> None:
    with atomic_destination(destination) as temporary, open(temporary, "xb") as handle:
        handle.write(data)
