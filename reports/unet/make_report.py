"""The U-Net family (issue 12) beside the shipped models, on the brick and grass test crops.

Run from the repository root (re-runnable: it evaluates every model again on the data's
current test split and rewrites report.json and report.md here):

    .venv/bin/python reports/unet/make_report.py

Models: the shipped ``eproj/models/{brick,grass}-*.pt`` and the U-Net runs
``runs/{brick,grass}-unet-{plain,corrupt,puzzle}/model.pt`` that exist (or the paths
given). Each model is evaluated on the reference (PyTorch) with the reconstruction
and with the projection under its calibrated stop rule (``eproj.train.evaluate``), on
every test image of its training data (no ensemble here, so no image is held out).
Maps: ``residual`` (x0 - f(x0))^2, ``dssim_reconstruction`` DSSIM(x0, f(x0)),
``permutation`` (unet only: Puzzle-AE's mean normalised squared error over the K
permutations) and ``dssim_projection`` DSSIM(x0, projection). Metrics per map: pixel
AUROC, AUPRO (FPR <= 0.3), image AUROC with the map's maximum as the image score. For
unet models also the paper's image-level protocol (image AUROC, FPR at TPR 0.99 and
0.995) for the puzzle score (Eq. 7) and the plain score (identity input).
Every threshold and normaliser comes from the models' calibration (validation images).

Copying (issue 12's "capacity vs copying"): on the normal *validation* crops (never
the test crops) with one synthetic defect each (``eproj.train.defects``, seed
``RETENTION_SEED``), the share of the defect the restoration keeps,
sum_mask (f(x_defect) - f(x_clean))^2 / sum_mask (x_defect - x_clean)^2, pooled over the
crops: 1 when f copies the defect, 0 when it restores the clean surface.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MAPS = ("residual", "dssim_reconstruction", "permutation", "dssim_projection")
TITLES = {"residual": "Residual", "dssim_reconstruction": "DSSIM recon.", "permutation": "Permutation",
          "dssim_projection": "DSSIM proj."}
DEFAULT_RUNS = tuple(f"runs/{t}-unet-{r}/model.pt" for t in ("brick", "grass") for r in ("plain", "corrupt", "puzzle"))
HERE = Path(__file__).resolve().parent
RETENTION_SEED = 4242


def defect_retention(trained: Any, data: str) -> dict[str, float]:
    """The share of a synthetic defect f keeps on the validation crops (the module docstring):
    ``pooled`` and the ``median`` over crops, and the number of ``crops``."""
    import torch

    from eproj.train.data import load_source, recorded_fit
    from eproj.train.defects import add_defect

    source = load_source(data, size=trained.config.size, fit=recorded_fit(trained.train))
    clean = np.ascontiguousarray(source.validation(), dtype=np.float32)
    rng = np.random.default_rng(RETENTION_SEED)
    foreign = getattr(source, "foreign", None) or []
    defective, masks = [], []
    for crop in clean:
        image, mask, _ = add_defect(rng, np.ascontiguousarray(crop.transpose(1, 2, 0)), foreign)
        defective.append(image.transpose(2, 0, 1))
        masks.append(mask)
    x_def = np.ascontiguousarray(np.stack(defective))
    m = np.stack(masks)[:, None]
    with torch.no_grad():
        f_clean = trained.model(torch.from_numpy(clean)).numpy()
        f_def = trained.model(torch.from_numpy(x_def)).numpy()
    kept = (((f_def - f_clean) ** 2) * m).reshape(len(clean), -1).sum(axis=1)
    added = (((x_def - clean) ** 2) * m).reshape(len(clean), -1).sum(axis=1)
    valid = added > 0
    return {"pooled": float(kept[valid].sum() / added[valid].sum()),
            "median": float(np.median(kept[valid] / added[valid])), "crops": int(valid.sum())}


def default_models(models: Path = Path("eproj/models"), runs: tuple[str, ...] = DEFAULT_RUNS) -> list[str]:
    """The shipped brick/grass models, then the U-Net runs that exist; a run whose model.pt is
    byte for byte a shipped file (the run that was shipped) is listed once, as the shipped file."""
    shipped = sorted(str(p) for p in models.glob("*.pt") if p.name.startswith(("brick-", "grass-")))
    return shipped + [p for p in runs if Path(p).is_file()
                      and not any(filecmp.cmp(p, s, shallow=False) for s in shipped)]


def _map_metrics(maps: list[np.ndarray], masks: list, labels: np.ndarray) -> dict[str, Any]:
    from eproj.train.metrics import aupro, image_auroc, pixel_auroc

    return {"pixel_auroc": pixel_auroc(maps, masks), "aupro_0.3": aupro(maps, masks, 0.3),
            "image_auroc": image_auroc(np.array([m.max() for m in maps]), labels)}


def evaluate_model(path: str, progress: bool) -> dict[str, Any]:
    """Every map's metrics of one model (see the module docstring)."""
    from eproj.train.checkpoint import MODEL_FORMAT, load_model, load_payload
    from eproj.train.evaluate import evaluate

    trained = load_model(path)
    trained_steps = int(load_payload(Path(path), MODEL_FORMAT)["step"])
    data = trained.train["data"]
    start = time.perf_counter()
    recon_report, recon = evaluate(trained, data, "reconstruction", progress=progress)
    proj_report, proj = evaluate(trained, data, "projection", progress=progress)
    masks = [r.sample.mask for r in recon]
    labels = np.array([r.sample.label for r in recon])
    maps = {"residual": [r.maps["l2"] for r in recon], "dssim_reconstruction": [r.maps["dssim"] for r in recon],
            "dssim_projection": [r.maps["dssim"] for r in proj]}
    if "permutation" in recon[0].maps:
        maps["permutation"] = [r.maps["permutation"] for r in recon]
    train = trained.train
    return {"model": path, "family": trained.config.family, "data": data,
            "train": {"steps": trained_steps, "steps_asked": train.get("steps"), "regime": train.get("regime") or "plain",
                      "corruption": train.get("corruption") if train.get("regime") == "corrupt" else None,
                      "weight_decay": train.get("weight_decay"), "adv_weight": train.get("adv_weight", 0.0),
                      "width": trained.config.width if trained.config.family == "unet" else None},
            "test_images": len(recon), "defective_images": int(labels.sum()),
            "metrics": {name: _map_metrics(m, masks, labels) for name, m in maps.items()},
            "puzzle_protocol": recon_report["metrics"].get("puzzle_protocol"),
            "defect_retention": defect_retention(trained, data),
            "projection": {"stop_rule": proj_report["stop_rule"], "mean_iterations": proj_report["iterations"]["mean"]},
            "seconds": time.perf_counter() - start}


def _label(result: dict[str, Any]) -> str:
    path = Path(result["model"])
    name = path.parent.name if path.name == "model.pt" else path.stem
    regime = result["train"]["regime"] + (f" ({result['train']['corruption']})" if result["train"]["corruption"] else "")
    return f"{name} — {result['family']}, {regime}, {result['train']['steps']} steps"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [f"# The U-Net family (issue 12) beside the shipped models\n",
             f"Made by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Reference (PyTorch) "
             f"evaluation on every test image of each model's training data; image AUROC per map with the map's "
             f"maximum as the image score; — where a model has no such map (the permutation map is the unet "
             f"family's). Thresholds and normalisers come from each model's calibration on validation images.\n"]
    for data in sorted({r["data"] for r in results}):
        rows = [r for r in results if r["data"] == data]
        lines.append(f"## {data} ({rows[0]['test_images']} test images, {rows[0]['defective_images']} defective)\n")
        for metric, title in (("pixel_auroc", "Pixel AUROC"), ("aupro_0.3", "AUPRO (FPR ≤ 0.3)"),
                              ("image_auroc", "Image AUROC (score: the map's maximum)")):
            lines += [f"### {title}\n", "| model | " + " | ".join(TITLES[m] for m in MAPS) + " |",
                      "| --- |" + " --- |" * len(MAPS)]
            for r in rows:
                cells = [_cell(r["metrics"].get(m, {}).get(metric)) for m in MAPS]
                lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### Copying: the share of a synthetic defect the restoration keeps (validation crops)\n",
                  "| model | pooled | median | crops |", "| --- | --- | --- | --- |"]
        for r in rows:
            k = r["defect_retention"]
            lines.append(f"| {_label(r)} | {_cell(k['pooled'])} | {_cell(k['median'])} | {k['crops']} |")
        lines.append("")
        unets = [r for r in rows if r.get("puzzle_protocol")]
        if unets:
            lines += ["### Puzzle-AE's image-level protocol (unet)\n",
                      "| model | score | image AUROC | FPR at TPR 0.99 | FPR at TPR 0.995 |", "| --- | --- | --- | --- | --- |"]
            for r in unets:
                for score in ("puzzle", "plain"):
                    p = r["puzzle_protocol"][score]
                    lines.append(f"| {_label(r)} | {score} | {_cell(p['image_auroc'])} | {_cell(p['fpr_at_tpr_0.99'])} "
                                 f"| {_cell(p['fpr_at_tpr_0.995'])} |")
            lines.append(f"\n{unets[0]['puzzle_protocol']['note']}.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="model.pt files [the shipped brick/grass models and the U-Net runs]")
    parser.add_argument("--out", default=str(HERE), help="folder for report.json and report.md [reports/unet]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    import torch

    from eproj.files import write_atomic

    torch.set_num_threads(args.threads)
    models = args.models or default_models()
    command = ".venv/bin/python reports/unet/make_report.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                                  if (argv if argv is not None else sys.argv[1:]) else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in models:
        print(f"evaluating {path}", file=sys.stderr)
        results.append(evaluate_model(path, progress=not args.quiet))
        payload = {"command": command, "models": models, "results": results}  # after each: nothing lost
        write_atomic(out / "report.json", json.dumps(payload, indent=2).encode())
        write_atomic(out / "report.md", markdown(results, command).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
