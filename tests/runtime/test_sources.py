"""eproj run's sources on bad input: oversized, truncated, special and same-named
files, a truncated video, cameras that never deliver or drop out. One bad input
is recorded and skipped; nothing blocks, nothing stops the source."""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from eproj.errors import DataError
from eproj.runtime.sources import _camera, decode_image, header_size, open_source


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit gray) with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _good(folder: Path, name: str, value: int = 128) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(folder / name), np.full((16, 16), value, np.uint8))


def _frames(spec: str, channels: int = 1, **options) -> list:
    return list(open_source(spec, channels, **options).frames())


@pytest.mark.parametrize("max_pixels,expected", [
    (64 * 1024 * 1024, "more than the limit of 67108864"),  # our header check, before decoding
    (2 ** 40, "cannot be decoded"),  # past ours: OpenCV's own limit raises cv2.error, which is caught
])
def test_a_huge_png_is_recorded_and_the_next_file_is_read(tmp_path, max_pixels, expected):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a-huge.png").write_bytes(_png(50000, 50000))
    _good(tmp_path / "in", "b-good.png")
    huge, good = _frames(str(tmp_path / "in"), max_pixels=max_pixels)
    assert huge.image is None and expected in huge.error
    assert good.name == "b-good.png" and good.image.shape == (16, 16)


def test_the_pixel_limit_is_settable(tmp_path):
    _good(tmp_path, "a.png")
    _good(tmp_path, "b.jpg")
    frames = _frames(str(tmp_path), max_pixels=255)
    assert all(f.image is None and "16x16 pixels, more than the limit of 255" in f.error for f in frames)
    assert all(f.image is not None for f in _frames(str(tmp_path), max_pixels=256))
    with pytest.raises(DataError, match="pixel limit must be >= 1"):
        open_source(str(tmp_path), 1, max_pixels=0)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".ppm"])
def test_header_sizes_are_read_without_decoding(suffix):
    ok, data = cv2.imencode(suffix, np.zeros((7, 13, 3), np.uint8))
    assert header_size(data.tobytes()) == (13, 7)


def test_fifos_and_devices_named_png_never_block(tmp_path):
    folder = tmp_path / "in"
    _good(folder, "a.png")
    os.mkfifo(folder / "b-fifo.png")
    os.symlink("/dev/zero", folder / "c-device.png")
    _good(folder, "d.png")
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(_frames(str(folder))), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "reading the folder blocked"
    assert [f.name for f in got] == ["a.png", "b-fifo.png", "c-device.png", "d.png"]
    assert [f.image is None for f in got] == [False, True, True, False]
    assert all("not a regular file" in f.error for f in got[1:3])
    with pytest.raises(DataError, match="neither a regular file nor a folder"):
        open_source(str(folder / "b-fifo.png"), 1)


@pytest.mark.parametrize("suffix,marker", [(".jpg", "end-of-image marker FFD9"), (".png", "no IEND chunk")])
def test_truncated_images_are_detected(tmp_path, suffix, marker):
    rng = np.random.default_rng(0)
    ok, data = cv2.imencode(suffix, rng.integers(0, 255, (64, 64), dtype=np.uint8))
    (tmp_path / f"cut{suffix}").write_bytes(data.tobytes()[:len(data) * 2 // 3])
    (tmp_path / f"whole{suffix}").write_bytes(data.tobytes())
    cut, whole = _frames(str(tmp_path))
    assert cut.image is None and marker in cut.error
    assert whole.image is not None and whole.image.shape == (64, 64)


def test_a_jpeg_padded_with_zeros_after_its_end_marker_is_whole():
    ok, data = cv2.imencode(".jpg", np.full((8, 8), 90, np.uint8))
    assert decode_image(data.tobytes() + b"\x00" * 16, "padded.jpg", ".jpg", True, 1000).shape == (8, 8)


def test_same_stem_different_suffix_get_different_names(tmp_path):
    _good(tmp_path / "in", "part.jpg", 10)
    _good(tmp_path / "in", "part.png", 200)
    assert [f.name for f in _frames(str(tmp_path / "in"))] == ["part.jpg", "part.png"]


def test_a_glob_over_folders_names_frames_by_their_relative_path(tmp_path):
    _good(tmp_path / "line1", "part.png")
    _good(tmp_path / "line2", "part.png")
    assert [f.name for f in _frames(str(tmp_path / "line*" / "*.png"))] == ["line1/part.png", "line2/part.png"]


def test_a_truncated_video_is_recorded(tmp_path):
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    rng = np.random.default_rng(0)
    for _ in range(10):
        writer.write(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    writer.release()
    whole = _frames(str(path))
    assert len(whole) == 10 and all(f.image is not None for f in whole)
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * 0.6)])
    frames = _frames(str(path))
    assert 0 < len(frames) - 1 < 10 and all(f.image is not None for f in frames[:-1])
    assert frames[-1].image is None
    assert f"ended after {len(frames) - 1} of the 10 frames its container records" in frames[-1].error


@pytest.mark.parametrize("spec", ["camera:-1", "camera:x", "camera:", "camera:1.5"])
def test_bad_camera_indices_are_refused(spec):
    with pytest.raises(DataError, match="camera:N with N a camera index >= 0"):
        open_source(spec, 1)


class FakeCamera:
    """A capture whose successive reads follow ``script`` (True: a frame) across reopenings."""

    script: list[bool] = []
    opened = 0

    def __init__(self, index):
        FakeCamera.opened += 1
        self.open = True

    def isOpened(self):
        return self.open

    def read(self):
        ok = FakeCamera.script.pop(0) if FakeCamera.script else True
        return ok, (np.zeros((8, 8, 3), np.uint8) if ok else None)

    def release(self):
        self.open = False


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_a_camera_that_never_delivers_is_an_error_after_the_timeout():
    FakeCamera.script, FakeCamera.opened = [False] * 1000, 0
    clock = FakeClock()
    frames = _camera(7, gray=True, first_frame_timeout=2.0, sleep=clock.sleep, open_capture=FakeCamera, clock=clock)
    with pytest.raises(DataError, match="camera 7 delivered no frame within 2 s"):
        next(frames)
    assert clock.now == pytest.approx(2.0) and set(clock.sleeps) == {0.25}


def test_a_camera_that_drops_out_is_reopened_with_back_off_and_retries_are_no_frames():
    FakeCamera.script, FakeCamera.opened = [False, True, False, False, False, True, True], 0
    clock, notices = FakeClock(), []
    frames = _camera(0, gray=True, first_frame_timeout=5.0, sleep=clock.sleep, open_capture=FakeCamera,
                     clock=clock, notify=notices.append)
    got = [next(frames) for _ in range(3)]
    assert all(f.image is not None and f.image.shape == (8, 8) for f in got)  # only delivered frames
    assert [f.name.rsplit("-", 1)[1] for f in got] == ["000000", "000001", "000002"]
    assert clock.sleeps == [0.25, 0.25, 0.5, 1.0]  # the first wait, then back-off doubling after frames came
    assert notices == [f"camera 0 delivered no frame; reopening in {d:g} s" for d in (0.25, 0.5, 1.0)]
    assert FakeCamera.opened == 5


def test_camera_frame_names_differ_between_sessions(monkeypatch):
    import eproj.runtime.sources as sources

    FakeCamera.script = []
    first = next(_camera(0, gray=True, open_capture=FakeCamera)).name
    assert first.startswith("camera0-") and first.endswith("-000000")
    real = sources.datetime

    class Later:
        @staticmethod
        def now(tz):
            return real(2031, 1, 1, tzinfo=tz)

    monkeypatch.setattr(sources, "datetime", Later)
    assert next(_camera(0, gray=True, open_capture=FakeCamera)).name == "camera0-20310101T000000-000000"
