"""The demo: plain reconstruction against projection on the embedded textures.

For every shipped model (``eproj/models/NAME.pt``, each produced
by the command in ``SHIPPED``) it exports a bundle (``eproj export``) and
evaluates both methods on the texture's test set with the runtime, the way an
inspection line runs it: ONNX Runtime on the CPU and the fused kernels
(``eproj.runtime.Inspector``). It writes ``report.json`` and one PNG panel per
model, and prints a table.
``--train`` retrains the models from scratch with the same commands first.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from eproj import __version__
from eproj.errors import CheckpointError, DataError
from eproj.train.checkpoint import TrainedModel, load_model
from eproj.export.onnx_graphs import export_bundle
from eproj.runtime import Inspector
from eproj.runtime.cli import put_label
from eproj.train.evaluate import SampleResult, evaluate, write_json

MODELS_DIR = Path(str(resources.files("eproj") / "models"))


@dataclass(frozen=True)
class ShippedModel:
    """How one shipped model was trained: ``eproj train --data DATA --model FAMILY --steps STEPS
    --lr LR [OPTIONS] --weights float16 --out runs/NAME`` reproduces eproj/models/NAME.pt
    (= runs/NAME/model.pt)."""

    data: str
    family: str
    steps: int
    lr: float
    # the other `eproj train` options the run needs (those not at their default), as on its command line
    options: tuple[str, ...] = ()


SHIPPED: dict[str, ShippedModel] = {
    "brick-l2ae": ShippedModel("textures:brick", "l2ae", 12000, 2e-4),
    "grass-l2ae": ShippedModel("textures:grass", "l2ae", 12000, 2e-4),
    "brick-vae": ShippedModel("textures:brick", "vae", 12000, 2e-4),
    "grass-vae": ShippedModel("textures:grass", "vae", 12000, 2e-4),
    # the U-Net (width 16) trained on 2x2 tile puzzles under FGSM (eps 0.01); its run predates the
    # U-Net's default Adam weight decay 1e-5 and trained without it (its optimizer state: 0)
    "grass-unet-puzzle": ShippedModel("textures:grass", "unet", 3600, 1e-3,
                                      ("--batch", "8", "--regime", "puzzle", "--weight-decay", "0")),
    # the U-Net (width 16) trained on partially corrupted crops (Bauer et al.), FGSM (eps 0.01), Adam
    # weight decay 1e-5: on validation crops it beats brick-l2ae (100-iteration projection pixel AUROC
    # 0.995 against 0.986)
    "brick-unet-corrupt": ShippedModel("textures:brick", "unet", 1500, 1e-3, ("--batch", "8", "--regime", "corrupt")),
}
PANEL_ROWS = 6
CELL = 192
BAR = 64  # the colour bar of each row's DSSIM maps, right of the cells
COLUMNS = ("input", "reconstruction", "projection", "DSSIM recon.", "DSSIM proj.",
           "mask recon.", "mask proj.")
FONT = cv2.FONT_HERSHEY_SIMPLEX


def train_command(name: str, out: Path | str | None = None, steps: int | None = None) -> str:
    """The `eproj train` command that produces shipped model ``name`` (into ``out``, default runs/NAME;
    ``steps`` instead of the recorded number)."""
    entry = SHIPPED[name]
    words = ["eproj", "train", "--data", entry.data, "--model", entry.family, "--steps", str(steps or entry.steps),
             "--lr", f"{entry.lr:g}", *entry.options, "--weights", "float16", "--out", str(out or f"runs/{name}")]
    return shlex.join(words)


def _gray_to_bgr(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float [0, 1] -> (CELL, CELL, 3) uint8 BGR."""
    img = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.shape[2] == 1 else img[:, :, ::-1].copy()
    return cv2.resize(img, (CELL, CELL), interpolation=cv2.INTER_LINEAR)


def _heat(amap: np.ndarray, vmax: float) -> np.ndarray:
    scaled = np.clip(amap / max(vmax, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    return cv2.resize(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), (CELL, CELL),
                      interpolation=cv2.INTER_NEAREST)


def _mask_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """Input with the predicted mask tinted red and the ground-truth contour in green."""
    base = _gray_to_bgr(image)
    pred_big = cv2.resize(pred.astype(np.uint8), (CELL, CELL), interpolation=cv2.INTER_NEAREST).astype(bool)
    base[pred_big] = (0.45 * base[pred_big] + 0.55 * np.array([40, 40, 255])).astype(np.uint8)
    if truth is not None and truth.any():
        big = cv2.resize(truth.astype(np.uint8), (CELL, CELL), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(base, contours, -1, (60, 220, 60), 2)
    return base


def _label(text: str, width: int, height: int = 32, scale: float = 0.6) -> np.ndarray:
    """A white strip with ``text`` in dark grey, left-aligned."""
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (6, height - 10), FONT, scale, (20, 20, 20), 1, cv2.LINE_AA)
    return strip


def colour_bar(vmax: float, height: int = CELL, width: int = BAR) -> np.ndarray:
    """The DSSIM maps' colour scale, (height, width, 3) uint8 BGR: the inferno ramp from
    0 (bottom) to ``vmax`` (top, the row's shared scale) with both values written beside it."""
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(14, axis=1)
    bar = np.full((height, width, 3), 255, np.uint8)
    bar[:, 4:18] = cv2.applyColorMap(ramp, cv2.COLORMAP_INFERNO)
    cv2.putText(bar, f"{vmax:.2f}", (20, 14), FONT, 0.42, (20, 20, 20), 1, cv2.LINE_AA)
    cv2.putText(bar, "0", (20, height - 4), FONT, 0.42, (20, 20, 20), 1, cv2.LINE_AA)
    return bar


def verdict(result: SampleResult, threshold: float) -> str:
    """The evaluation's verdict (``SampleResult.defect``) as DEFECT or ok; for a result
    not judged there, the image score against the calibrated score ``threshold``."""
    defect = getattr(result, "defect", None)
    return "DEFECT" if (result.score > threshold if defect is None else defect) else "ok"


def row_caption(recon: SampleResult, proj: SampleResult, trained: TrainedModel) -> str:
    """The caption of one panel row: the image, its truth, each method's score and verdict."""
    truth = "defective" if recon.sample.label == 1 else "good"
    parts = [f"{recon.sample.name} ({truth})"]
    for method, short, result in (("reconstruction", "recon.", recon), ("projection", "proj.", proj)):
        label = verdict(result, trained.segmentation_threshold(method, "score"))
        reason = getattr(result, "reason", "")
        parts.append(f"{short} score {result.score:.3f} {label}" + (f" ({reason})" if reason else ""))
    parts.append(f"{proj.iterations:.0f} iterations")
    return "  |  ".join(parts)


def panel(name: str, trained: TrainedModel, recon: list[SampleResult], proj: list[SampleResult]) -> np.ndarray:
    """One picture per model: a row per chosen test image, the columns in ``COLUMNS`` and the
    colour bar of the row's DSSIM maps; each row's caption gives both methods' scores and verdicts,
    and each mask cell its method's verdict."""
    defective = [i for i, r in enumerate(recon) if r.sample.label == 1]
    good = [i for i, r in enumerate(recon) if r.sample.label == 0]
    chosen = defective[:PANEL_ROWS - 1] + good[:1]
    t_rec = trained.segmentation_threshold("reconstruction")
    t_proj = trained.segmentation_threshold("projection")
    s_rec = trained.segmentation_threshold("reconstruction", "score")
    s_proj = trained.segmentation_threshold("projection", "score")
    width = CELL * len(COLUMNS) + BAR
    rows = [np.concatenate([_label(c, CELL) for c in COLUMNS] + [_label("DSSIM", BAR, scale=0.45)], axis=1)]
    for i in chosen:
        r, p = recon[i], proj[i]
        image = r.sample.image
        vmax = float(max(np.percentile(r.maps["dssim"], 99.9), np.percentile(p.maps["dssim"], 99.9), 1e-6))
        masks = [_mask_overlay(image, r.maps["dssim"] > t_rec, r.sample.mask),
                 _mask_overlay(image, p.maps["dssim"] > t_proj, p.sample.mask)]
        for cell, result, threshold in zip(masks, (r, p), (s_rec, s_proj)):
            label = verdict(result, threshold)
            put_label(cell, f"{label} {result.score:.3f}", (0, 0, 255) if label == "DEFECT" else (60, 200, 60))
        cells = [_gray_to_bgr(image), _gray_to_bgr(r.target), _gray_to_bgr(p.target),
                 _heat(r.maps["dssim"], vmax), _heat(p.maps["dssim"], vmax), *masks, colour_bar(vmax)]
        rows.append(_label(row_caption(r, p, trained), width, scale=0.55))
        rows.append(np.concatenate(cells, axis=1))
    title = _label(f"{name}: input, f(x0), projection, DSSIM maps (shared scale per row, bar at right), "
                   f"masks (red) with ground truth (green)", width, 36)
    return np.concatenate([title] + rows, axis=0)


def _method_summary(report: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": report["metrics"], "iterations": report["iterations"],
            "seconds": report["seconds"], "images": len(report["images"])}


def _models(out: Path, retrain: bool, steps: int | None) -> dict[str, Path]:
    if retrain:
        from eproj.cli import build_parser

        paths = {}
        for name in SHIPPED:
            run = out / "runs" / name
            command = train_command(name, run, steps)
            print(f"training {name}: {command}")
            args = build_parser().parse_args(shlex.split(command)[1:])
            args.func(args)  # exactly the printed command
            paths[name] = run / "model.pt"
        return paths
    paths = {name: MODELS_DIR / f"{name}.pt" for name in SHIPPED}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise CheckpointError(f"shipped models missing: {', '.join(missing)}; run `eproj demo --train`")
    return paths


def print_table(report: dict[str, Any]) -> None:
    width = max([len("model"), *map(len, report["models"])])
    header = (f"{'model':<{width}} {'method':<15} {'pixAUROC':>9} {'AUPRO':>7} {'imgAUROC':>9} {'bestF1':>7} "
              f"{'iters':>6} {'s':>6}")
    print(header)
    print("-" * len(header))
    for name, entry in report["models"].items():
        for method in ("reconstruction", "projection"):
            m = entry[method]["metrics"]["dssim"]
            fmt = lambda v: "   n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{name:<{width}} {method:<15} {fmt(m['pixel_auroc']):>9} {fmt(m['aupro_0.3']):>7} "
                  f"{fmt(m['image_auroc']):>9} {fmt(m['best_f1']):>7} "
                  f"{entry[method]['iterations']['mean']:>6.1f} {entry[method]['seconds']:>6.1f}")
    verdict = report["projection_beats_reconstruction"]
    print(f"\nprojection beats reconstruction in pixel AUROC on {sum(verdict.values())}/{len(verdict)} models")


def run_demo(out: Path, retrain: bool = False, steps: int | None = None, threads: int = 0) -> dict[str, Any]:
    """Evaluate both methods for every demo model; write report.json and panels into ``out``
    (the runtime on ``threads`` CPU threads, 0: every core)."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"eproj": __version__, "map": "dssim", "models": {},
                              "projection_beats_reconstruction": {}}
    for name, path in _models(out, retrain, steps).items():
        trained = load_model(path)
        data = trained.train.get("data")
        if not data:
            raise DataError(f"{path} does not record its training data")
        bundle = out / "bundles" / name
        export_bundle(trained, bundle)
        inspectors = {method: Inspector.from_bundle(bundle, backend="onnxruntime", method=method, fit="none",
                                                    channel_order="rgb", batch_size=48, threads=threads)
                      for method in ("reconstruction", "projection")}
        recon_report, recon = evaluate(trained, data, "reconstruction", inspector=inspectors["reconstruction"])
        proj_report, proj = evaluate(trained, data, "projection", inspector=inspectors["projection"])
        report["models"][name] = {
            "model": str(path), "data": data, "family": trained.config.family,
            "train_command": train_command(name), "steps": trained.train.get("steps"),
            "engine": proj_report["engine"], "bundle": str(bundle),
            "reconstruction": _method_summary(recon_report), "projection": _method_summary(proj_report),
        }
        a_rec = recon_report["metrics"]["dssim"]["pixel_auroc"]
        a_proj = proj_report["metrics"]["dssim"]["pixel_auroc"]
        report["projection_beats_reconstruction"][name] = bool(a_proj is not None and a_rec is not None
                                                               and a_proj > a_rec)
        picture = out / f"{name}.png"
        if not cv2.imwrite(str(picture), panel(name, trained, recon, proj)):
            raise DataError(f"cannot write {picture}")
        write_json(report, out / "report.json")  # after every model: nothing is lost on interruption
    print_table(report)
    print(f"\nwrote {out / 'report.json'} and {len(report['models'])} panels in {out}")
    return report
