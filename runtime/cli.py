"""``eproj run`` (stream frames through an Inspector) and ``eproj bench`` (latency).

``run`` writes, into its output folder:
- ``masks/NAME.png``: the defect mask (0 / 255) at the frame's size;
- ``overlays/NAME.jpg``: the frame with the defect contours in red and the verdict
  (ok, DEFECT, or FAILED for a frame eproj could not vouch for) with the score;
- ``results.jsonl``: one JSON line per frame (name, score, defect, failed, reason,
  iterations, stop reasons, latency in ms), or the reason a frame could not be read.

NAME is unique per input: an image's file name with its suffix (``part.jpg`` and
``part.png`` give ``masks/part.jpg.png`` and ``masks/part.png.png``), its path
relative to the common folder for a glob over several folders, a video's frame
index, a camera's session start and frame index.

Images are written atomically before their line, and each line is appended in one
checked write: a run stopped at any point, or one that fills the disk, leaves only
complete files and valid lines. A rerun into the same folder resumes: inputs
already recorded in ``results.jsonl`` are skipped (``restart=True`` starts over).
Every line is strict JSON: a non-finite number is written as null and its frame
recorded as failed, which counts as defective (fail closed).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from eproj.errors import ConfigError, DataError, EprojError
from eproj.files import write_atomic
from eproj.runtime.inspector import InspectionResult, Inspector
from eproj.runtime.sources import DEFAULT_FIRST_FRAME_TIMEOUT, DEFAULT_MAX_PIXELS, Source, check_spec, open_source

RESULTS = "results.jsonl"


def put_label(image: np.ndarray, text: str, colour: tuple[int, int, int]) -> None:
    """Write ``text`` at the top left of BGR uint8 ``image`` in ``colour`` on a black box, at a
    size that grows with the frame (never under OpenCV's font scale 0.35)."""
    scale = max(0.35, min(image.shape[0] / 400, image.shape[1] / 250))
    thickness = max(1, int(round(scale * 1.5)))
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.rectangle(image, (0, 0), (width + 6, height + baseline + 6), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, text, (3, height + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def verdict(result: InspectionResult) -> str:
    """A result's label: FAILED (no verdict eproj can vouch for; counted as defective), DEFECT or ok."""
    if result.failed:
        return "FAILED"
    return "DEFECT" if result.defect else "ok"


def overlay(frame: np.ndarray, result: InspectionResult) -> np.ndarray:
    """The frame (BGR uint8) with the mask's contours in red and the verdict and score written on it."""
    image = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR) if frame.ndim == 2 or frame.shape[2] == 1 else frame.copy()
    contours, _ = cv2.findContours(result.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, (0, 0, 255), max(1, image.shape[0] // 200))
    label = verdict(result)
    colour = {"ok": (60, 200, 60), "DEFECT": (0, 0, 255), "FAILED": (0, 165, 255)}[label]
    score = f"{result.score:.3f}" if math.isfinite(result.score) else "n/a"
    put_label(image, f"{label} {score}", colour)
    return image


def _write_image(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(path.suffix, image)
    if not ok:
        raise DataError(f"cannot encode {path}")
    try:
        write_atomic(path, encoded.tobytes())
    except OSError as error:
        raise DataError(f"cannot write {path}: {error.strerror or error}; the run stops here "
                        "(rerun the same command to resume)") from None


def finite_or_none(value: Any) -> tuple[Any, bool]:
    """``value`` with every non-finite float (NaN, ±Inf) replaced by None, in nested dicts
    and lists too, and whether any was replaced."""
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (None, True)
    if isinstance(value, dict):
        pairs = [(k, finite_or_none(v)) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, any(bad for _, (_, bad) in pairs)
    if isinstance(value, (list, tuple)):
        items = [finite_or_none(v) for v in value]
        return [v for v, _ in items], any(bad for _, bad in items)
    return value, False


def result_record(name: str, result: InspectionResult, latency_ms: float) -> dict[str, Any]:
    """The results.jsonl line of an inspected frame, strict JSON.

    ``failed`` and ``reason`` come from the Inspector; a frame with a non-finite score,
    latency or timing is recorded as failed too (and so defective), its numbers as null."""
    record: dict[str, Any] = {"name": name, "score": float(result.score),
                              "defect": bool(result.defect) or result.failed, "failed": bool(result.failed),
                              "reason": str(result.reason), "iterations": int(result.iterations),
                              "stop_reasons": sorted(set(result.stop_reasons)), "latency_ms": float(latency_ms),
                              "timings_ms": {k: float(v) for k, v in result.timings.items()}}
    record, replaced = finite_or_none(record)
    if replaced and not record["failed"]:
        record["failed"] = record["defect"] = True
        record["reason"] = "a non-finite score or timing (written as null)"
    return record


class _Results:
    """results.jsonl: the names already recorded, and one line per frame appended in one
    checked write.

    A short or failed write (a full disk) truncates the file back to its last complete
    line and raises DataError, so every earlier line stays valid. An unterminated last
    line left by an earlier run is dropped when the file is opened (``dropped_tail``)."""

    def __init__(self, path: Path, restart: bool):
        self.path = path
        self.recorded: set[str] = set()
        self.dropped_tail = False
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if restart else 0), 0o644)
        except OSError as error:
            raise DataError(f"cannot open {path} for writing: {error.strerror or error}") from None
        try:
            self._load()
        except BaseException:
            os.close(self.fd)
            raise

    def _load(self) -> None:
        chunks = []
        while chunk := os.read(self.fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            os.ftruncate(self.fd, len(complete))
            self.dropped_tail = True
        for number, line in enumerate(complete.splitlines(), 1):
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise DataError(f"{self.path} line {number} is not JSON: it was not written by eproj run, or was "
                                "edited. Pass --restart to start over, or choose another --out") from None
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                raise DataError(f"{self.path} line {number} names no frame; pass --restart to start over, or "
                                "choose another --out")
            self.recorded.add(record["name"])
        os.lseek(self.fd, 0, os.SEEK_END)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        offset = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            written = os.write(self.fd, data)
            problem = "" if written == len(data) else f"only {written} of {len(data)} bytes were written"
        except OSError as error:
            problem = error.strerror or str(error)
        if problem:
            try:
                os.ftruncate(self.fd, offset)
            except OSError:
                pass
            raise DataError(f"cannot append to {self.path}: {problem} (disk full?); the run stops here and "
                            "every earlier line is complete (rerun the same command to resume)")
        self.recorded.add(record["name"])

    def close(self) -> None:
        os.close(self.fd)


def _gui_available() -> bool:
    try:
        cv2.namedWindow("eproj")
        return True
    except cv2.error:
        return False


def prepare_out(out: Path) -> None:
    """Create ``out``, ``out/masks`` and ``out/overlays``; DataError when one is a file or
    ``out`` cannot be written."""
    for folder in (out, out / "masks", out / "overlays"):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder} is a file; eproj run needs a folder there (--out)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"cannot create the output folder {folder}: {error.strerror or error}") from None
    for folder in (out, out / "masks", out / "overlays"):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise DataError(f"the output folder {folder} is not writable")


def run_stream(inspector: Inspector, source_spec: str | Source, out: Path, show: bool = False,
               max_frames: int | None = None, progress: bool = True, restart: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS,
               first_frame_timeout: float = DEFAULT_FIRST_FRAME_TIMEOUT) -> dict[str, int]:
    """Inspect every frame of a source into ``out`` (see the module docstring).

    Returns counts: ``inspected`` (including ``failed``), ``defective`` (including
    ``failed``), ``failed`` (inspected, but no verdict eproj can vouch for), ``skipped``
    (unreadable inputs, recorded with their reason) and ``resumed`` (inputs already in
    results.jsonl, not inspected again; never a camera's frames). ``max_frames`` bounds
    the frames inspected or skipped by this run; resumed inputs and a camera's
    reconnection attempts do not count. ``source_spec`` is a spec for ``open_source`` or a
    ``Source`` already made (e.g. frames from memory, as the soak benchmark feeds).
    """
    if isinstance(source_spec, Source):
        source = source_spec
    else:
        source = open_source(source_spec, inspector.bundle.channels, max_pixels=max_pixels,
                             first_frame_timeout=first_frame_timeout,
                             notify=lambda message: print(f"eproj: {message}", file=sys.stderr))
    if show and not _gui_available():
        raise ConfigError("--show needs OpenCV with GUI support (pip install opencv-python, not -headless)")
    prepare_out(out)
    results = _Results(out / RESULTS, restart)
    if results.dropped_tail:
        print(f"eproj: dropped the incomplete last line of {out / RESULTS} (a write cut short)", file=sys.stderr)
    counts = {"inspected": 0, "defective": 0, "failed": 0, "skipped": 0, "resumed": 0}
    total = source.total if max_frames is None else min(source.total or max_frames, max_frames)
    bar = tqdm(total=total, unit="frame", desc=source.description, disable=not progress)
    try:
        for frame in source.frames():
            if max_frames is not None and counts["inspected"] + counts["skipped"] >= max_frames:
                break
            if not source.live and frame.name in results.recorded:
                counts["resumed"] += 1
                bar.update()
                continue
            if frame.image is None:
                _skip(results, frame.name, frame.error, counts, bar)
                continue
            start = time.perf_counter()
            try:
                result = inspector(frame.image)[0]
            except EprojError as error:  # e.g. a frame of another size, or an empty frame
                _skip(results, frame.name, str(error), counts, bar)
                continue
            latency = 1e3 * (time.perf_counter() - start)
            record = result_record(frame.name, result, latency)
            result.failed, result.reason, result.defect = record["failed"], record["reason"], record["defect"]
            picture = overlay(frame.image, result)
            _write_image(out / "masks" / f"{frame.name}.png", result.mask.astype(np.uint8) * 255)
            _write_image(out / "overlays" / f"{frame.name}.jpg", picture)
            results.write(record)
            counts["inspected"] += 1
            counts["defective"] += int(record["defect"])
            counts["failed"] += int(record["failed"])
            bar.update()
            bar.set_postfix(defective=counts["defective"], failed=counts["failed"], ms=f"{latency:.0f}")
            if show:
                cv2.imshow("eproj", picture)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
    finally:
        bar.close()
        results.close()
    return counts


def _skip(results: _Results, name: str, reason: str, counts: dict[str, int], bar: Any) -> None:
    """Report and record a frame that could not be inspected."""
    print(f"eproj: skipped {name}: {reason}", file=sys.stderr)
    results.write({"name": name, "error": reason})
    counts["skipped"] += 1
    bar.update()


def _stop_on_sigterm() -> None:
    """SIGTERM ends a run like Ctrl-C: the frame in flight is dropped, the files written stay."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def inspector_from_args(args: Any, **extra: Any) -> Inspector:
    overrides = {k: getattr(args, k) for k in ("max_iters", "alpha", "lam", "step", "weighting", "energy_tol",
                                              "stop_threshold") if getattr(args, k, None) is not None}
    overrides.update(extra)
    return Inspector.from_bundle(args.bundle, backend=args.backend, device=args.device, method=args.method,
                                 fit=args.fit, channel_order="bgr", batch_size=getattr(args, "batch_size", 16),
                                 threads=args.threads, precision=args.precision,
                                 stop_rule=getattr(args, "stop_rule", None), scale=getattr(args, "scale", None),
                                 tile_stride=getattr(args, "tile_stride", None), **overrides)


def summary(counts: dict[str, int]) -> str:
    """One line on what a run did."""
    line = (f"inspected {counts['inspected']} frames ({counts['defective']} defective, of which "
            f"{counts['failed']} failed; {counts['skipped']} skipped as unreadable)")
    if counts["resumed"]:
        line += f"; {counts['resumed']} inputs were already recorded by an earlier run and were not inspected again"
    return line


def cmd_run(args: Any, open_inspector: Any = None) -> int:
    """``eproj run``: every frame of ``--source`` through the inspector ``open_inspector(args)``
    gives (default ``inspector_from_args``; a PIAD bundle passes its own), written by ``run_stream``."""
    _stop_on_sigterm()
    out = Path(args.out)
    check_spec(args.source)  # before loading the bundle: a bad --source or --out is told at once
    prepare_out(out)
    with (open_inspector or inspector_from_args)(args) as inspector:
        print(f"eproj run: {inspector.backend_note}", file=sys.stderr)
        counts = run_stream(inspector, args.source, out, show=args.show, max_frames=args.max_frames,
                            restart=args.restart, max_pixels=args.max_pixels,
                            first_frame_timeout=args.first_frame_timeout)
    print(f"{summary(counts)}; wrote {out / RESULTS}, masks and overlays")
    return 0
