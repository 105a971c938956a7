"""eproj run's bookkeeping with a stand-in inspector (no bundle, fast): unique
output names, resume and --restart, a full disk, strict JSON, failed frames,
bad output folders, and a camera's retries against --max-frames."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import eproj.runtime.cli as run_cli
import eproj.runtime.sources as sources
from eproj.errors import DataError
from eproj.runtime.cli import overlay, run_stream
from eproj.runtime.inspector import InspectionResult


class StandIn:
    """Inspects a gray frame: the mask is where pixels are dark; the score is the mean
    darkness, or ``score`` when given; ``failed`` marks every result as failed."""

    def __init__(self, score: float | None = None, failed: bool = False):
        self.bundle = SimpleNamespace(channels=1)
        self.score, self.failed, self.calls = score, failed, 0

    def __call__(self, frame: np.ndarray) -> list[InspectionResult]:
        self.calls += 1
        mask = frame < 50
        score = float(mask.mean()) if self.score is None else self.score
        return [InspectionResult(anomaly_map=mask.astype(np.float32), mask=mask, score=score, defect=score > 0.1,
                                 projection=frame[:, :, None] / 255.0, iterations=1, stop_reasons=["threshold"],
                                 timings={"total": 1.0}, failed=self.failed,
                                 reason="unlike any normal frame" if self.failed else "")]


def _image(folder: Path, name: str, dark: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((40, 40), 200, np.uint8)
    if dark:
        image[5:25, 5:25] = 0
    assert cv2.imwrite(str(folder / name), image)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_same_stem_inputs_keep_their_own_masks_and_overlays(tmp_path):
    _image(tmp_path / "in", "part.jpg", dark=True)
    _image(tmp_path / "in", "part.png", dark=False)
    counts = run_stream(StandIn(), str(tmp_path / "in"), tmp_path / "out", progress=False)
    assert counts["inspected"] == 2
    assert [line["name"] for line in _lines(tmp_path / "out")] == ["part.jpg", "part.png"]
    dark = cv2.imread(str(tmp_path / "out" / "masks" / "part.jpg.png"), cv2.IMREAD_GRAYSCALE)
    light = cv2.imread(str(tmp_path / "out" / "masks" / "part.png.png"), cv2.IMREAD_GRAYSCALE)
    assert dark.max() == 255 and light.max() == 0
    assert {p.name for p in (tmp_path / "out" / "overlays").iterdir()} == {"part.jpg.jpg", "part.png.jpg"}


def test_a_rerun_resumes_and_restart_starts_over(tmp_path):
    for i in range(5):
        _image(tmp_path / "in", f"{i}.png", dark=i % 2 == 0)
    out = tmp_path / "out"
    first = StandIn()
    assert run_stream(first, str(tmp_path / "in"), out, max_frames=3, progress=False)["inspected"] == 3
    second = StandIn()
    counts = run_stream(second, str(tmp_path / "in"), out, progress=False)
    assert (counts["inspected"], counts["resumed"], second.calls) == (2, 3, 2)
    names = [line["name"] for line in _lines(out)]
    assert names == [f"{i}.png" for i in range(5)]  # each once
    again = StandIn()
    assert run_stream(again, str(tmp_path / "in"), out, progress=False)["resumed"] == 5 and again.calls == 0
    counts = run_stream(StandIn(), str(tmp_path / "in"), out, restart=True, progress=False)
    assert (counts["inspected"], counts["resumed"]) == (5, 0) and len(_lines(out)) == 5


def test_a_rerun_drops_an_unterminated_last_line_and_refuses_a_foreign_file(tmp_path, capsys):
    _image(tmp_path / "in", "a.png", dark=False)
    _image(tmp_path / "in", "b.png", dark=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"name": "a.png", "score": 0.0}\n{"name": "b.pn')
    counts = run_stream(StandIn(), str(tmp_path / "in"), out, progress=False)
    assert (counts["resumed"], counts["inspected"]) == (1, 1)
    assert [line["name"] for line in _lines(out)] == ["a.png", "b.png"]
    assert "dropped the incomplete last line" in capsys.readouterr().err
    (out / "results.jsonl").write_text("these are not results\n")
    with pytest.raises(DataError, match="line 1 is not JSON.*--restart"):
        run_stream(StandIn(), str(tmp_path / "in"), out, progress=False)


def test_a_short_write_stops_the_run_and_keeps_every_earlier_line(tmp_path, monkeypatch):
    for i in range(4):
        _image(tmp_path / "in", f"{i}.png", dark=False)
    real_write = os.write
    calls = []

    def disk_fills(fd, data):
        calls.append(len(data))
        return real_write(fd, data[:len(data) // 2] if len(calls) == 3 else data)

    monkeypatch.setattr(run_cli.os, "write", disk_fills)
    with pytest.raises(DataError, match="only .* bytes were written.*every earlier line is complete"):
        run_stream(StandIn(), str(tmp_path / "in"), tmp_path / "out", progress=False)
    text = (tmp_path / "out" / "results.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["name"] for line in text.splitlines()] == ["0.png", "1.png"]


def test_a_failed_write_stops_the_run(tmp_path, monkeypatch):
    _image(tmp_path / "in", "0.png", dark=False)

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_cli.os, "write", full)
    with pytest.raises(DataError, match="No space left on device"):
        run_stream(StandIn(), str(tmp_path / "in"), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "results.jsonl").read_text() == ""


@pytest.mark.parametrize("score", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_scores_are_null_and_the_frame_failed(tmp_path, score):
    _image(tmp_path / "in", "a.png", dark=False)
    counts = run_stream(StandIn(score=score), str(tmp_path / "in"), tmp_path / "out", progress=False)
    raw = (tmp_path / "out" / "results.jsonl").read_text()
    line = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in results.jsonl"))
    assert line["score"] is None and line["failed"] and line["defect"] and "non-finite" in line["reason"]
    assert (counts["failed"], counts["defective"]) == (1, 1)


def test_failed_frames_are_recorded_counted_and_labelled(tmp_path):
    _image(tmp_path / "in", "a.png", dark=False)
    counts = run_stream(StandIn(score=0.0, failed=True), str(tmp_path / "in"), tmp_path / "out", progress=False)
    line, = _lines(tmp_path / "out")
    assert line["failed"] and line["defect"] and line["reason"] == "unlike any normal frame"
    assert (counts["inspected"], counts["failed"], counts["defective"]) == (1, 1, 1)
    assert "1 defective, of which 1 failed" in run_cli.summary(counts)


@pytest.mark.parametrize("failed,defect,label", [(True, False, "FAILED"), (False, True, "DEFECT"),
                                                 (False, False, "ok")])
def test_the_overlay_says_the_verdict(failed, defect, label):
    frame = np.full((200, 300), 200, np.uint8)
    result = InspectionResult(np.zeros((200, 300), np.float32), np.zeros((200, 300), bool), 0.5, defect,
                              np.zeros((200, 300, 1), np.float32), 1, ["threshold"], failed=failed)
    assert run_cli.verdict(result) == label
    picture = overlay(frame, result)
    colour = {"FAILED": (0, 165, 255), "DEFECT": (0, 0, 255), "ok": (60, 200, 60)}[label]
    assert (picture[:40, :200] == colour).all(axis=2).sum() > 50  # the label is drawn, in its colour


def test_unreadable_and_uninspectable_frames_are_skipped_and_the_run_goes_on(tmp_path):
    _image(tmp_path / "in", "a.png", dark=True)
    (tmp_path / "in" / "b.png").write_bytes(b"not an image")
    _image(tmp_path / "in", "c.png", dark=False)

    class RefusesC(StandIn):
        def __call__(self, frame):
            if frame.mean() > 199:
                raise DataError("frame 0: the frame is empty")
            return super().__call__(frame)

    counts = run_stream(RefusesC(), str(tmp_path / "in"), tmp_path / "out", progress=False)
    assert (counts["inspected"], counts["skipped"]) == (1, 2)
    lines = _lines(tmp_path / "out")
    assert [line["name"] for line in lines] == ["a.png", "b.png", "c.png"]
    assert "not a readable image" in lines[1]["error"] and "empty" in lines[2]["error"]


def test_an_output_folder_that_is_a_file_is_refused(tmp_path):
    _image(tmp_path / "in", "a.png", dark=False)
    (tmp_path / "out").write_text("")
    with pytest.raises(DataError, match="is a file"):
        run_stream(StandIn(), str(tmp_path / "in"), tmp_path / "out", progress=False)
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "masks").write_text("")
    with pytest.raises(DataError, match="masks is a file"):
        run_stream(StandIn(), str(tmp_path / "in"), tmp_path / "out2", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(tmp_path):
    _image(tmp_path / "in", "a.png", dark=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    try:
        with pytest.raises(DataError, match="not writable"):
            run_stream(StandIn(), str(tmp_path / "in"), tmp_path / "out", progress=False)
    finally:
        (tmp_path / "out").chmod(0o700)


def test_an_image_that_cannot_be_written_stops_the_run_clearly(tmp_path, monkeypatch):
    _image(tmp_path / "in", "a.png", dark=False)

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_cli, "write_atomic", full)
    with pytest.raises(DataError, match="cannot write .*a.png.png: No space left on device"):
        run_stream(StandIn(), str(tmp_path / "in"), tmp_path / "out", progress=False)


def test_camera_retries_never_count_toward_max_frames(tmp_path, monkeypatch):
    script = [True, False, False, True, False, True, True, True]

    class Camera:
        def __init__(self, index):
            self.open = True

        def isOpened(self):
            return self.open

        def read(self):
            ok = script.pop(0) if script else True
            return ok, (np.full((40, 40), 200, np.uint8) if ok else None)

        def release(self):
            self.open = False

    real_camera = sources._camera

    def camera(index, gray, first_frame_timeout, notify):
        return real_camera(index, gray, first_frame_timeout, sleep=lambda s: None, open_capture=Camera,
                               notify=notify)

    monkeypatch.setattr(sources, "_camera", camera)
    inspector = StandIn()
    counts = run_stream(inspector, "camera:0", tmp_path / "out", max_frames=4, progress=False)
    assert (counts["inspected"], counts["skipped"], inspector.calls) == (4, 0, 4)
    assert len(_lines(tmp_path / "out")) == 4
