"""Where ``eproj run`` reads frames from: a camera, a video file, an image folder or a glob.

Each source yields ``Frame``s: a name unique within the source, the BGR/gray
uint8 image, or the reason it could not be read (recorded and skipped by the
caller). One bad input never stops or hangs the run:

- image files are read only when they are regular files (a FIFO or device named
  ``*.png`` would block the read forever), are decoded from memory, and are refused
  when their header claims more than ``max_pixels`` pixels (PNG, JPEG, BMP, PGM/PPM
  headers are read before decoding; other formats are checked after) or when the
  file is truncated (a JPEG without its end-of-image marker, a PNG without IEND);
- a video that ends before the frame count its container records yields one last
  Frame saying so;
- a camera must deliver a first frame within ``first_frame_timeout`` seconds, or
  the source raises ``DataError``; after it has delivered frames, a camera that
  drops out is reopened with exponential back-off, and the retries are reported
  through ``notify``, never yielded as frames.
"""

from __future__ import annotations

import glob
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from eproj.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg")
# 64 megapixels: above any inspection camera we know of, far below what would exhaust an edge box
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_FIRST_FRAME_TIMEOUT = 10.0

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); C4, C8 and CC are not frames
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class Frame:
    """``name``: unique within its source (an image's path relative to the source, a
    video's frame index, a camera's session and frame index); ``image``: uint8 (H, W)
    or (H, W, 3) BGR, or None with ``error`` saying why."""

    name: str
    image: np.ndarray | None
    error: str = ""


@dataclass
class Source:
    """``frames()`` yields Frames; ``total`` is their number where known (None for cameras);
    ``live``: a camera, whose frames are new on every run (a rerun never skips them)."""

    description: str
    total: int | None
    frames: Callable[[], Iterator[Frame]]
    live: bool = False


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or PGM/PPM header, None for other formats
    or a header too short to say. Reads no pixel data."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:2] in (b"P2", b"P3", b"P5", b"P6"):
        fields = data[2:64].split()
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            return int(fields[0]), int(fields[1])
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a JPEG's first start-of-frame segment."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def truncation(data: bytes, suffix: str) -> str:
    """Why a PNG or JPEG file is incomplete ("" when it ends as its format says it must).

    A JPEG must end with the end-of-image marker FFD9 (trailing zero padding allowed),
    a PNG with its IEND chunk. Other formats are not checked here."""
    if data.startswith(_PNG_SIGNATURE):
        return "" if data.endswith(_PNG_IEND) else "the PNG is truncated (no IEND chunk at its end)"
    if data.startswith(b"\xff\xd8") or suffix in (".jpg", ".jpeg"):
        return "" if data.rstrip(b"\x00").endswith(b"\xff\xd9") else \
            "the JPEG is truncated (no end-of-image marker FFD9 at its end)"
    return ""


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; raises DataError otherwise.

    Opened without blocking and checked again on the open descriptor, so a FIFO or
    device put in place of the file between listing and reading never blocks."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f"{path} is not a regular file (a FIFO, device or socket); only files are read")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise DataError(f"cannot open {path}: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{path} is not a regular file (a FIFO, device or socket); only files are read")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    finally:
        os.close(fd)


def decode_image(data: bytes, name: str, suffix: str, gray: bool, max_pixels: int) -> np.ndarray:
    """Decode an encoded image to uint8 (H, W) gray or (H, W, 3) BGR; DataError when it is
    larger than ``max_pixels``, truncated, or not an image OpenCV can decode."""
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise DataError(f"{name} is {size[0]}x{size[1]} pixels, more than the limit of {max_pixels} "
                        f"(--max-pixels)")
    why = truncation(data, suffix)
    if why:
        raise DataError(f"{name}: {why}")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise DataError(f"{name} cannot be decoded: {str(error).strip().splitlines()[-1]}") from None
    if image is None or image.size == 0:
        raise DataError(f"{name} is not a readable image")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise DataError(f"{name} is {image.shape[1]}x{image.shape[0]} pixels, more than the limit of "
                        f"{max_pixels} (--max-pixels)")
    return image


def _read_image(path: Path, name: str, gray: bool, max_pixels: int) -> Frame:
    try:
        data = read_regular_file(path)
        return Frame(name, decode_image(data, str(path), path.suffix.lower(), gray, max_pixels))
    except DataError as error:
        return Frame(name, None, str(error))


def _files(paths: list[Path], root: Path, gray: bool, max_pixels: int) -> Iterator[Frame]:
    """Each image, named by its path relative to ``root`` (suffix kept: part.jpg and part.png differ)."""
    for path in paths:
        yield _read_image(path, path.relative_to(root).as_posix(), gray, max_pixels)


def _video(path: Path, gray: bool, expected: int | None) -> Iterator[Frame]:
    """The video's frames; when it ends before the ``expected`` count its container
    records, one last Frame without an image says where it ended."""
    capture = cv2.VideoCapture(str(path))
    index = 0
    try:
        while True:
            ok, image = capture.read()
            if not ok or image is None or image.size == 0:
                break
            if gray:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            yield Frame(f"{path.stem}-{index:06d}", image)
            index += 1
    finally:
        capture.release()
    if expected is not None and index < expected:
        yield Frame(f"{path.stem}-{index:06d}", None,
                    f"{path} ended after {index} of the {expected} frames its container records "
                    "(truncated or damaged)")


def _camera(index: int, gray: bool, first_frame_timeout: float = DEFAULT_FIRST_FRAME_TIMEOUT,
            max_backoff: float = 8.0, sleep: Callable[[float], None] = time.sleep,
            open_capture: Callable[[int], cv2.VideoCapture] = cv2.VideoCapture,
            clock: Callable[[], float] = time.monotonic,
            notify: Callable[[str], None] = lambda message: None) -> Iterator[Frame]:
    """Frames from camera ``index`` until the caller stops.

    Until the first frame, failed reads are retried every 0.25 s; with no frame after
    ``first_frame_timeout`` seconds it raises DataError. After frames have come, a
    failed read closes and reopens the camera after 0.25 s, doubling up to
    ``max_backoff`` while it keeps failing; each retry is told to ``notify``, and only
    delivered frames are yielded. Names carry the session's start time (UTC), so a
    later run into the same folder never reuses one."""
    session = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    capture = open_capture(index)
    start = clock()
    delay = 0.25
    count = 0
    try:
        while True:
            ok, image = capture.read() if capture.isOpened() else (False, None)
            if ok and image is not None and image.size > 0:
                delay = 0.25
                if gray and image.ndim == 3:
                    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
                yield Frame(f"camera{index}-{session}-{count:06d}", image)
                count += 1
                continue
            capture.release()
            if count == 0:
                if clock() - start >= first_frame_timeout:
                    raise DataError(f"camera {index} delivered no frame within {first_frame_timeout:g} s "
                                    "(no such camera, or it is busy); --first-frame-timeout sets the wait")
                sleep(0.25)
            else:
                notify(f"camera {index} delivered no frame; reopening in {delay:g} s")
                sleep(delay)
                delay = min(2 * delay, max_backoff)
            capture = open_capture(index)
    finally:
        capture.release()


def check_spec(spec: str) -> None:
    """Refuse a malformed ``camera:N`` at once, before anything slow (loading a bundle) runs."""
    if spec.startswith("camera:"):
        _camera_index(spec)


def _camera_index(spec: str) -> int:
    """N of ``camera:N``: a decimal index >= 0 (OpenCV treats negative indices as "any camera",
    and some of its backends crash on them)."""
    text = spec.partition(":")[2]
    if not text.strip().isdigit():
        raise DataError(f"a camera source is camera:N with N a camera index >= 0 (camera:0), got {spec!r}")
    return int(text)


def open_source(spec: str, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                first_frame_timeout: float = DEFAULT_FIRST_FRAME_TIMEOUT,
                notify: Callable[[str], None] = lambda message: None) -> Source:
    """``camera:N``, a video file, an image folder, or a glob pattern of images.

    ``max_pixels`` bounds the pixels of an image file; ``first_frame_timeout`` is how
    long a camera may take to deliver its first frame; ``notify`` receives a camera's
    reconnection notices."""
    if max_pixels < 1:
        raise DataError(f"the pixel limit must be >= 1, got {max_pixels}")
    gray = channels == 1
    if spec.startswith("camera:"):
        index = _camera_index(spec)
        return Source(f"camera {index}", None,
                      lambda: _camera(index, gray, first_frame_timeout, notify=notify), live=True)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return Source(f"folder {path} ({len(files)} images)", len(files),
                      lambda: _files(files, path, gray, max_pixels))
    if path.exists() and not path.is_file():
        raise DataError(f"source {path} is neither a regular file nor a folder")
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            capture.release()
            raise DataError(f"{path} cannot be opened as a video")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        capture.release()
        return Source(f"video {path}", count, lambda: _video(path, gray, count))
    if path.is_file():
        return Source(f"image {path}", 1, lambda: _files([path], path.parent, gray, max_pixels))
    matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if matches:
        root = Path(os.path.commonpath([p.parent for p in matches]))
        return Source(f"{len(matches)} images matching {spec}", len(matches),
                      lambda: _files(matches, root, gray, max_pixels))
    raise DataError(f"source {spec!r} is no camera:N, video file, image folder or matching glob")
