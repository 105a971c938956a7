"""Tile strides compared on full frames of validation texture: the quality each stride keeps.

A frame larger than the model is inspected in overlapping tiles (``eproj.tiles``); the
stride sets how many: on a 512 x 512 working frame, 49 tiles at half a tile (64 pixels
for the 128-pixel models), 36 at 80, 25 at 96, 16 at 128 (side by side). Fewer tiles
is proportionally faster (``benchmarks/full_frame.py``), so the runtime's default stride
should be the largest one that keeps the maps' quality (it is half a tile, the stride this
script measures the others against, until another one passes). This script measures that
quality on validation data only:

- frames: ``--frames`` windows of ``--side`` pixels (at the model's working scale) of the
  texture's validation region (``TextureSource.validation_region``, the bottom-left
  quarter, never seen in training or test), extended by mirroring where the window leaves
  it (textures look alike mirrored; training crops are flipped at random), at seeded
  random offsets;
- defects: two thirds of the frames get ``--defects`` synthetic defects
  (``eproj.train.defects``, the calibration's generator), each drawn in a model-sized
  window at a uniformly random position, so most defects lie across tile borders at
  some stride; the rest stay normal;
- each frame goes through ``Inspector`` (ONNX Runtime, fit "tile") once per stride with
  the bundle's calibrated stop rule, and at half a tile with ``--reference-iterations``
  (100: the quality reference of the calibration, no stop, no gate).

Reported per model and setting: pixel AUROC and AUPRO of the frame-size maps, frame AUROC
of the frame score, the fraction of normal and defective frames the verdict flags, mean
iterations per tile, tiles per frame and seconds per frame (a shared machine: timings
belong to ``benchmarks/full_frame.py``). The chosen stride: the largest whose pixel AUROC
and AUPRO are within ``QUALITY_SLACK`` (0.005, the calibration's) of half a tile's on every
model.

    python benchmarks/tile_stride.py --threads 2 --out reports/tile-stride
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

MODELS = ("brick-l2ae", "brick-vae", "grass-l2ae", "grass-vae")
DEFECT_SEED = 104729  # this script's own seed for frame offsets and defects


def validation_frames(region: np.ndarray, side: int, count: int, defects: int, size: int,
                      foreign: list[np.ndarray], seed: int) -> list[dict[str, Any]]:
    """``count`` frames (side, side, C) float32 cut from ``region`` mirrored without end, two
    thirds with ``defects`` synthetic defects each in a ``size``-pixel window at a random
    position: dicts of ``image``, ``mask`` (side, side) bool, ``label`` and ``kinds``."""
    from eproj.train.defects import add_defect

    rng = np.random.default_rng(seed)
    h, w = region.shape[:2]
    reps = (-(-2 * side // h) + 1, -(-2 * side // w) + 1)
    plane = np.pad(region, ((0, reps[0] * h), (0, reps[1] * w), (0, 0)), mode="symmetric")
    frames = []
    for i in range(count):
        y, x = rng.integers(0, plane.shape[0] - side), rng.integers(0, plane.shape[1] - side)
        image = np.ascontiguousarray(plane[y:y + side, x:x + side], dtype=np.float32)
        mask = np.zeros((side, side), bool)
        kinds: list[str] = []
        if i % 3 != 2:
            for _ in range(defects):
                wy, wx = rng.integers(0, side - size + 1, size=2)
                window = np.ascontiguousarray(image[wy:wy + size, wx:wx + size])
                changed, where, kind = add_defect(rng, window, foreign)
                image[wy:wy + size, wx:wx + size] = changed
                mask[wy:wy + size, wx:wx + size] |= where
                kinds.append(kind)
        frames.append({"image": image, "mask": mask, "label": int(mask.any()), "kinds": kinds})
    return frames


def measure(inspector: Any, frames: list[dict[str, Any]], desc: str) -> dict[str, Any]:
    """Every frame once through ``inspector``; the setting's metrics."""
    from eproj.train.metrics import aupro, image_auroc, pixel_auroc

    maps, scores, flagged, iterations, tiles = [], [], [], [], []
    start = time.perf_counter()
    for frame in tqdm(frames, desc=desc, leave=False):
        result = inspector(frame["image"])[0]
        if result.failed:
            raise RuntimeError(f"{desc}: a frame failed: {result.reason}")
        maps.append(result.anomaly_map.astype(np.float32))
        scores.append(result.score)
        flagged.append(result.defect)
        iterations += result.tile_iterations
        tiles.append(len(result.tile_iterations))
    seconds = time.perf_counter() - start
    masks = [f["mask"] for f in frames]
    labels = np.array([f["label"] for f in frames])
    flagged_arr = np.array(flagged)
    return {"pixel_auroc": pixel_auroc(maps, masks), "aupro": aupro(maps, masks),
            "frame_auroc": image_auroc(np.array(scores), labels),
            "normal_frames_flagged": float(flagged_arr[labels == 0].mean()),
            "defective_frames_flagged": float(flagged_arr[labels == 1].mean()),
            "mean_iterations_per_tile": float(np.mean(iterations)), "tiles_per_frame": float(np.mean(tiles)),
            "seconds_per_frame": seconds / len(frames)}


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# Tile strides on full frames of validation texture", "",
             f"Command: `{payload['command']}`", "",
             f"{payload['frames']['count']} frames of {payload['frames']['side']} x {payload['frames']['side']} "
             f"pixels at the working scale, cut from each texture's validation region (mirrored where a frame "
             f"leaves it); {payload['frames']['defective']} of them with {payload['frames']['defects_per_frame']} "
             "synthetic defects each at random positions. ONNX Runtime, fit \"tile\". Seconds per frame on a "
             "shared machine (frame rates: `benchmarks/full_frame.py`).", "",
             "The verdict's flags per frame are in report.json only: the tiles over a mirror seam of these "
             "frames score above the per-tile threshold, so the verdict flags normal frames here for a reason "
             "no stride changes.", "",
             "| model | setting | stride | tiles / frame | pixel AUROC | AUPRO | frame AUROC | iterations / tile "
             "| s / frame |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for model, rows in payload["models"].items():
        for row in rows:
            m = row["metrics"]
            lines.append(f"| {model} | {row['setting']} | {row['stride']} | {m['tiles_per_frame']:.0f} | "
                         f"{f(m['pixel_auroc'])} | {f(m['aupro'])} | {f(m['frame_auroc'])} | "
                         f"{m['mean_iterations_per_tile']:.1f} | {m['seconds_per_frame']:.2f} |")
    choice = payload["choice"]
    lines += ["", f"Chosen stride: **{choice['stride']}** ({choice['rule']}).", ""]
    for stride, why in choice["per_stride"].items():
        lines.append(f"- stride {stride}: {why}")
    return "\n".join(lines) + "\n"


def choose(models: dict[str, list[dict[str, Any]]], half: int, slack: float) -> dict[str, Any]:
    """The largest stride whose calibrated rows keep pixel AUROC and AUPRO within ``slack`` of
    half a tile's on every model."""
    strides = sorted({row["stride"] for rows in models.values() for row in rows if row["setting"] == "calibrated"})
    per_stride, chosen = {}, half
    for stride in strides:
        worst = []
        for model, rows in models.items():
            at = {row["stride"]: row["metrics"] for row in rows if row["setting"] == "calibrated"}
            for metric in ("pixel_auroc", "aupro"):
                worst.append((at[stride][metric] - at[half][metric], model, metric))
        change, model, metric = min(worst)
        keeps = change >= -slack
        if change >= 0:
            per_stride[str(stride)] = f"no loss against stride {half} on any model"
        else:
            per_stride[str(stride)] = (f"largest loss against stride {half}: {-change:.4f} ({model}, {metric}); "
                                       + ("within" if keeps else "outside") + f" {slack}")
        if keeps and stride > chosen:
            chosen = stride
    return {"stride": chosen, "rule": f"the largest stride within {slack} of stride {half} in pixel AUROC "
                                      "and AUPRO on every model, validation frames only",
            "per_stride": per_stride}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="shipped models (eproj/models/NAME.pt)")
    parser.add_argument("--strides", default="64,80,96,128", help="tile strides measured with the calibrated rule")
    parser.add_argument("--side", type=int, default=512, help="frame side at the working scale")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--defects", type=int, default=2, help="defects per defective frame")
    parser.add_argument("--reference-iterations", type=int, default=100,
                        help="iterations of the reference at half a tile (0: no reference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="folder for report.json and report.md")
    args = parser.parse_args()

    from eproj.export.onnx_graphs import export_bundle
    from eproj.files import write_atomic
    from eproj.runtime import Inspector
    from eproj.runtime.frames import default_stride
    from eproj.train.calibrate import QUALITY_SLACK
    from eproj.train.checkpoint import load_model
    from eproj.train.data import load_source

    strides = [int(s) for s in args.strides.split(",")]
    payload: dict[str, Any] = {"command": "python " + shlex.join(sys.argv), "python": platform.python_version(),
                               "models": {}}
    half = None
    for name in args.models.split(","):
        path = Path("eproj/models") / f"{name}.pt"
        trained = load_model(path)
        size = trained.config.size
        half = default_stride(size)  # the runtime's default, every other stride's reference
        if half not in strides:
            strides = [half] + strides
        source = load_source(trained.train["data"], size, fit=trained.train.get("input", {}).get("fit"))
        frames = validation_frames(source.validation_region, args.side, args.frames, args.defects, size,
                                   source.foreign, DEFECT_SEED)
        payload["frames"] = {"side": args.side, "count": len(frames), "defective": sum(f["label"] for f in frames),
                             "defects_per_frame": args.defects, "seed": DEFECT_SEED}
        rows = []
        with tempfile.TemporaryDirectory() as bundle:
            export_bundle(str(path), bundle)
            common = {"backend": "onnxruntime", "fit": "tile", "channel_order": "rgb", "threads": args.threads,
                      "scale": 1.0}
            settings = [("calibrated", stride, {}) for stride in sorted(strides)]
            if args.reference_iterations:
                settings.append((f"{args.reference_iterations} iterations", half,
                                 {"stop_rule": "training-min", "stop_threshold": -1.0,
                                  "max_iters": args.reference_iterations}))
            for setting, stride, options in settings:
                with Inspector.from_bundle(bundle, tile_stride=stride, **common, **options) as inspector:
                    metrics = measure(inspector, frames, f"{name} {setting} stride {stride}")
                rows.append({"setting": setting, "stride": stride, "options": options, "metrics": metrics})
                print(f"{name:>12} {setting:>15} stride {stride:>3}: pixel AUROC {metrics['pixel_auroc']:.4f} "
                      f"AUPRO {metrics['aupro']:.4f} frames flagged {metrics['normal_frames_flagged']:.2f} / "
                      f"{metrics['defective_frames_flagged']:.2f} iterations {metrics['mean_iterations_per_tile']:.1f}",
                      flush=True)
        payload["models"][name] = rows
    assert half is not None
    payload["choice"] = choose(payload["models"], half, QUALITY_SLACK)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(payload, indent=2).encode())
    write_atomic(out / "report.md", markdown(payload).encode())
    print(f"chosen stride {payload['choice']['stride']}; wrote {out}/report.json and report.md")


if __name__ == "__main__":
    main()
