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
    return _decode(path, _read_bytes(path), flags)


# Decodes as the camera meant the image to be seen (EXIF orientation applied), with its 16-bit or float samples and
# its single channel if gray. Unlike IMREAD_UNCHANGED, which ignores the orientation, it drops any alpha plane.
_UPRIGHT = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
_JPEG_SIGNATURE = b"\xff\xd8\xff"


def read_upright_image(path: Path) -> np.ndarray:
    """``path`` decoded upright (EXIF orientation applied) with its sample type, its channel count (1 for gray) and
    its alpha plane, oriented as the colour is; raises UnusableImage as :func:`read_image` does.

    OpenCV applies the orientation only to decodes that drop alpha, so a file with alpha is decoded twice, and the
    unchanged decode is turned as the upright decode's colour shows it was.
    """
    data = _read_bytes(path)
    if data[:3].tobytes() == _JPEG_SIGNATURE:  # JPEG has no alpha plane
        return _decode(path, data, _UPRIGHT)
    unchanged = _decode(path, data, cv2.IMREAD_UNCHANGED)
    if unchanged.ndim == 2 or unchanged.shape[2] != 4:
        return _decode(path, data, _UPRIGHT)
    try:
        upright = _decode(path, data, _UPRIGHT)
    except UnusableImage:
        # OpenCV 5.0 cannot drop the alpha of a float32 TIFF while decoding; its TIFF decodes come upright anyway.
        return unchanged
    for candidate in _orientations(unchanged):
        if np.array_equal(candidate[..., :3], upright, equal_nan=True):
            return np.ascontiguousarray(candidate)
    raise UnusableImage(path, "its alpha plane cannot be oriented as its colour; save it without the EXIF "
                              "orientation (or without alpha)")


def _orientations(image: np.ndarray) -> tuple[np.ndarray, ...]:
    """``image`` as each of the 8 EXIF orientations displays it, the likeliest first: none, then the camera's
    rotations, then mirrorings. A colour that several of them leave alike (a flat colour, say) gets the likeliest
    one, which the alpha plane then follows."""
    transposed = image.swapaxes(0, 1)
    return (image, transposed[:, ::-1], image[::-1, ::-1], transposed[::-1],
            image[:, ::-1], image[::-1], transposed, transposed[::-1, ::-1])


def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise UnusableImage(path, f"cannot be read ({err.strerror or err})") from err


def _decode(path: Path, data: np.ndarray, flags: int) -> np.ndarray:
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
