"""Where ``eproj run`` reads frames from: a camera, a video file, an image folder or a glob.

Each source yields ``Frame``s: a name, the BGR/gray uint8 image, or the reason it
could not be read (reported and skipped by the caller). A camera that stops
delivering frames is reopened with exponential back-off; the run goes on.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from eproj.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg")


@dataclass
class Frame:
    name: str
    image: np.ndarray | None
    error: str = ""


@dataclass
class Source:
    """``frames()`` yields Frames; ``total`` is their number where known (None for cameras)."""

    description: str
    total: int | None
    frames: Callable[[], Iterator[Frame]]


def _read_image(path: Path, gray: bool) -> Frame:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if image is None:
        return Frame(path.stem, None, f"{path} is not a readable image")
    return Frame(path.stem, image)


def _files(paths: list[Path], gray: bool) -> Iterator[Frame]:
    for path in paths:
        yield _read_image(path, gray)


def _video(path: Path, gray: bool) -> Iterator[Frame]:
    capture = cv2.VideoCapture(str(path))
    try:
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                return
            if gray:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            yield Frame(f"{path.stem}-{index:06d}", image)
            index += 1
    finally:
        capture.release()


def _camera(index: int, gray: bool, max_backoff: float = 8.0, sleep: Callable[[float], None] = time.sleep,
            open_capture: Callable[[int], cv2.VideoCapture] = cv2.VideoCapture) -> Iterator[Frame]:
    """Frames from camera ``index`` forever; a failed read closes and reopens the
    camera after 0.25 s, doubling up to ``max_backoff`` while it keeps failing."""
    capture = open_capture(index)
    delay = 0.25
    count = 0
    try:
        while True:
            ok, image = capture.read() if capture.isOpened() else (False, None)
            if not ok:
                capture.release()
                yield Frame(f"camera{index}-{count:06d}", None,
                            f"camera {index} delivered no frame; reopening in {delay:g} s")
                sleep(delay)
                delay = min(2 * delay, max_backoff)
                capture = open_capture(index)
                continue
            delay = 0.25
            if gray and image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            yield Frame(f"camera{index}-{count:06d}", image)
            count += 1
    finally:
        capture.release()


def open_source(spec: str, channels: int) -> Source:
    """``camera:N``, a video file, an image folder, or a glob pattern of images."""
    gray = channels == 1
    if spec.startswith("camera:"):
        try:
            index = int(spec.partition(":")[2])
        except ValueError:
            raise DataError(f"a camera source looks like camera:0, got {spec!r}") from None
        return Source(f"camera {index}", None, lambda: _camera(index, gray))
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return Source(f"folder {path} ({len(files)} images)", len(files), lambda: _files(files, gray))
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise DataError(f"{path} cannot be opened as a video")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        capture.release()
        return Source(f"video {path}", count, lambda: _video(path, gray))
    if path.is_file():
        return Source(f"image {path}", 1, lambda: _files([path], gray))
    matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if matches:
        return Source(f"{len(matches)} images matching {spec}", len(matches), lambda: _files(matches, gray))
    raise DataError(f"source {spec!r} is no camera:N, video file, image folder or matching glob")
