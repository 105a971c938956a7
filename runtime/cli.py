"""``eproj run`` (stream frames through an Inspector) and ``eproj bench`` (latency).

``run`` writes, into its output folder:
- ``masks/NAME.png``: the defect mask (0 / 255) at the frame's size;
- ``overlays/NAME.jpg``: the frame with the defect contours in red and the score;
- ``results.jsonl``: one JSON line per frame (name, score, defect, iterations,
  stop reasons, latency in ms), or the reason a frame could not be read.
Images are written atomically before their line, and each line is appended and
flushed in one write: a run stopped at any point leaves only complete files.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from eproj.errors import ConfigError, DataError
from eproj.files import write_atomic
from eproj.runtime.inspector import InspectionResult, Inspector
from eproj.runtime.sources import open_source


def overlay(frame: np.ndarray, result: InspectionResult) -> np.ndarray:
    """The frame (BGR uint8) with the mask's contours in red and the score written on it."""
    image = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR) if frame.ndim == 2 or frame.shape[2] == 1 else frame.copy()
    contours, _ = cv2.findContours(result.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, (0, 0, 255), max(1, image.shape[0] // 200))
    colour = (0, 0, 255) if result.defect else (60, 200, 60)
    label = f"{'DEFECT' if result.defect else 'ok'} {result.score:.3f}"
    scale = max(0.4, image.shape[0] / 500)
    cv2.putText(image, label, (5, int(20 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return image


def _write_image(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(path.suffix, image)
    if not ok:
        raise DataError(f"cannot encode {path}")
    write_atomic(path, encoded.tobytes())


class _Results:
    """results.jsonl, one flushed line per frame."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def _gui_available() -> bool:
    try:
        cv2.namedWindow("eproj")
        return True
    except cv2.error:
        return False


def run_stream(inspector: Inspector, source_spec: str, out: Path, show: bool = False,
               max_frames: int | None = None, progress: bool = True) -> dict[str, int]:
    """Inspect every frame of a source; returns counts of inspected, defective and skipped frames."""
    source = open_source(source_spec, inspector.bundle.channels)
    if show and not _gui_available():
        raise ConfigError("--show needs OpenCV with GUI support (pip install opencv-python, not -headless)")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    results = _Results(out / "results.jsonl")
    counts = {"inspected": 0, "defective": 0, "skipped": 0}
    total = source.total if max_frames is None else min(source.total or max_frames, max_frames)
    bar = tqdm(total=total, unit="frame", desc=source.description, disable=not progress)
    try:
        for frame in source.frames():
            if max_frames is not None and counts["inspected"] + counts["skipped"] >= max_frames:
                break
            if frame.image is None:
                print(f"eproj: skipped {frame.name}: {frame.error}", file=sys.stderr)
                results.write({"name": frame.name, "error": frame.error})
                counts["skipped"] += 1
                bar.update()
                continue
            start = time.perf_counter()
            try:
                result = inspector(frame.image)[0]
            except DataError as error:  # e.g. a frame of another size in a folder
                print(f"eproj: skipped {frame.name}: {error}", file=sys.stderr)
                results.write({"name": frame.name, "error": str(error)})
                counts["skipped"] += 1
                bar.update()
                continue
            latency = 1e3 * (time.perf_counter() - start)
            picture = overlay(frame.image, result)
            _write_image(out / "masks" / f"{frame.name}.png", result.mask.astype(np.uint8) * 255)
            _write_image(out / "overlays" / f"{frame.name}.jpg", picture)
            results.write({"name": frame.name, "score": result.score, "defect": result.defect,
                           "iterations": result.iterations, "stop_reasons": sorted(set(result.stop_reasons)),
                           "latency_ms": latency, "timings_ms": result.timings})
            counts["inspected"] += 1
            counts["defective"] += int(result.defect)
            bar.update()
            bar.set_postfix(defective=counts["defective"], ms=f"{latency:.0f}")
            if show:
                cv2.imshow("eproj", picture)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
    finally:
        bar.close()
        results.close()
    return counts


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
                                 threads=args.threads, precision=args.precision, **overrides)


def cmd_run(args: Any) -> int:
    _stop_on_sigterm()
    with inspector_from_args(args) as inspector:
        print(f"eproj run: {inspector.backend_note}", file=sys.stderr)
        out = Path(args.out)
        counts = run_stream(inspector, args.source, out, show=args.show, max_frames=args.max_frames)
    print(f"inspected {counts['inspected']} frames ({counts['defective']} defective, {counts['skipped']} "
          f"skipped); wrote {out / 'results.jsonl'}, masks and overlays")
    return 0
