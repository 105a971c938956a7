"""PIAD (issue 13) beside the shipped models, on the brick and grass test crops.

Run from the repository root (re-runnable: it evaluates every PIAD model again on the data's
current test split and rewrites report.json and report.md here):

    .venv/bin/python reports/piad/make_report.py

Models: the PIAD runs ``runs/{brick,grass}-piad{,-l2,-perc,-perc_l1}/model.pt`` that exist (or the
paths given; the suffix names the ablation's reconstruction loss).
Each is evaluated on the reference (PyTorch) by ``eproj.train.piad_calibrate.evaluate_piad``
on every test image of its training data, the test split drawn at the crop size the shipped
models were tested at (``--test-size``, 128): the same 48 crops with the same seeded defects,
each cut into PIAD's tiles side by side, an image's score its largest tile's.

- Image AUROC first (the paper's protocol: one score per test image against its label):
  PIAD's own score, the one its verdict uses: A(x) = relative-perceptual-L1(x, G(E(x))), or the
  loss an ablation run was trained with; the shipped models' score is their map's
  maximum (DSSIM to the projection and to the reconstruction).
- Pixel AUROC and AUPRO (FPR <= 0.3) per map: PIAD's feature map |f~(x) - f~(G(E(x)))| summed over
  channels and upsampled, and DSSIM(x, G(E(x))).
- The ablation in kind of the paper's Table 3 (right): image AUROC of four scores of each
  trained PIAD model, ``l2`` (pixel MSE), ``perc`` (MSE of the raw features: the perceptual
  loss), ``perc_l1`` (L1 of the mu/sigma-normalised features) and ``rel_perc_l1`` (A(x)). The
  paper's ablation trains one model per loss (the loss is both the reconstruction term and
  the score): runs trained with ``eproj train --model piad --reconstruction-loss L`` give those
  rows (their own score starred); a model trained with rel_perc_l1 alone shows the score's
  share of the effect. Each cell carries a 95 % percentile bootstrap interval over the test
  images (``eproj.train.metrics.image_auroc_interval``), and each model trained with another
  loss is compared with the rel_perc_l1 model of its data, own score against own score, by the
  paired bootstrap interval of the difference (``auroc_difference_interval``): the paper's
  ranking on CIFAR-10 is a comparison of this kind, and on a few dozen crops it is often within
  the draw.

Run folders do not outlive a working copy (``runs/`` is not committed). ``--keep REPORT`` carries
over the rows of an earlier report.json whose model is not evaluated this time, each marked in
report.md with the command that evaluated it; every row of one data must then still have been
tested on the same images with the same labels, or the script refuses (re-evaluate them all).

The other models' rows (the shipped autoencoders and the U-Net runs) are read from
``reports/unet/report.json`` (``--shipped``), their reference evaluation on the same test crops
(re-run that report to refresh them); this script checks that its test split has the same
number of images and defects.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_RUNS = tuple(f"runs/{t}-piad{loss}/model.pt" for t in ("brick", "grass")
                     for loss in ("", "-l2", "-perc", "-perc_l1"))
SHIPPED = "reports/unet/report.json"
SHIPPED_MAPS = {"dssim_projection": "DSSIM proj.", "dssim_reconstruction": "DSSIM recon."}
PIAD_MAPS = {"feature": "feature map (abs. difference of f~, summed over channels)", "dssim": "DSSIM(x, G(E(x)))"}
ABLATION = {"l2": "L2 (pixel MSE)", "perc": "perc (feature MSE)", "perc_l1": "perc-L1 (normalised, L1)",
            "rel_perc_l1": "rel-perc-L1 (A(x))"}


def evaluate_model(path: str, test_size: int) -> dict[str, Any]:
    """One PIAD model's figures (see the module docstring)."""
    from eproj.train.metrics import image_auroc_interval
    from eproj.train.piad_calibrate import evaluate_piad, load_piad_model

    start = time.perf_counter()
    trained = load_piad_model(path)
    report = evaluate_piad(trained, test_size=test_size)
    labels = [row["label"] for row in report["images"]]
    scores = {k: [row["scores"][k] for row in report["images"]] for k in ABLATION}
    m = report["metrics"]
    return {"model": path, "family": "piad", "data": report["data"], "step": trained.step,
            "train": {**{k: trained.train.get(k) for k in ("batch", "n_dis", "steps", "seed")},
                      "reconstruction_loss": trained.train.get("reconstruction_loss", "rel_perc_l1")},
            "config": trained.config.to_dict(), "features": trained.features, "stats_source": trained.stats.source,
            "test_size": report["test_size"], "test_images": len(labels), "defective_images": int(sum(labels)),
            "image_auroc": m["image_scores"],
            "image_auroc_interval": {k: image_auroc_interval(np.array(v), np.array(labels)) for k, v in scores.items()},
            "images": [row["name"] for row in report["images"]], "labels": labels, "image_scores": scores,
            "maps": {name: {"pixel_auroc": m[name]["pixel_auroc"], "aupro_0.3": m[name]["aupro_0.3"]}
                     for name in PIAD_MAPS},
            "verdict": m["verdict"], "seconds": time.perf_counter() - start}


def shipped_rows(path: Path, datas: set[str]) -> list[dict[str, Any]]:
    """The rows of ``path`` (a reports/unet report.json: the shipped models and the U-Net runs) on
    ``datas``; none when it does not exist."""
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text())["results"] if r["data"] in datas]


def keep_rows(results: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """``results`` with the rows of the earlier report ``path`` whose model is not among them, in
    that report's order (a fresh row takes the place of its model's old one; new models come last).
    A kept row records where it came from (``kept_from``: report and command; a row kept before
    keeps its first origin). Refuses a data whose rows were tested on different images or labels."""
    from eproj.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"--keep {path}: no such report.json")
    old = json.loads(path.read_text())
    fresh = {r["model"]: r for r in results}
    merged = []
    for r in old.get("results", []):
        if r["model"] in fresh:
            merged.append(fresh.pop(r["model"]))
        else:
            origin = r.get("kept_from") or {"report": str(path), "command": old.get("command")}
            merged.append({**r, "kept_from": origin})
    merged += fresh.values()
    for r in merged:
        first = next(b for b in merged if b["data"] == r["data"])
        if (r["images"], r["labels"]) != (first["images"], first["labels"]):
            raise ConfigError(f"{r['model']} and {first['model']} were tested on different images or labels of "
                              f"{r['data']} (the test split changed since {path} was made); re-evaluate every model "
                              f"instead of keeping rows")
    return merged


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _interval(bounds: list[float] | tuple[float, float] | None) -> str:
    return "" if bounds is None else f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"


def own_loss_differences(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model trained with another loss against the rel_perc_l1 model of its data, own score
    against own score on the same test images: the AUROC difference and its paired bootstrap
    interval. Refuses rows whose test images differ (they cannot be paired)."""
    from eproj.errors import ConfigError
    from eproj.train.metrics import auroc_difference_interval

    found = []
    for r in results:
        own = r["train"]["reconstruction_loss"]
        base = next((b for b in results if b["data"] == r["data"]
                     and b["train"]["reconstruction_loss"] == "rel_perc_l1"), None)
        if own == "rel_perc_l1" or base is None:
            continue
        if (r["images"], r["labels"]) != (base["images"], base["labels"]):
            raise ConfigError(f"{r['model']} and {base['model']} were tested on different images of "
                              f"{r['data']}; their scores cannot be paired")
        found.append({"model": r["model"], "loss": own, "against": base["model"], "data": r["data"],
                      "difference": r["image_auroc"][own] - base["image_auroc"]["rel_perc_l1"],
                      "interval": auroc_difference_interval(np.array(r["image_scores"][own]),
                                                           np.array(base["image_scores"]["rel_perc_l1"]),
                                                           np.array(r["labels"]))})
    return found


def _piad_label(r: dict[str, Any]) -> str:
    c, t = r["config"], r["train"]
    return (f"{Path(r['model']).parent.name} — PIAD {c['size']}x{c['size']}, width {c['width']}, latent "
            f"{c['latent']}, {r['features']['network']} {r['features']['tap']}, batch {t['batch']}, n_dis "
            f"{t['n_dis']}, {r['step']} steps")


def _shipped_label(r: dict[str, Any]) -> str:
    path = Path(r["model"])
    shipped = path.parts[:2] == ("eproj", "models")
    name = path.stem if shipped else path.parent.name
    return f"{name} — {r['family']}, {r['train']['steps']} steps" + (" (shipped)" if shipped else "")


def markdown(results: list[dict[str, Any]], shipped: list[dict[str, Any]], command: str, shipped_from: str,
             differences: list[dict[str, Any]]) -> str:
    """report.md; ``differences``: ``own_loss_differences(results)``."""
    lines = ["# PIAD (issue 13) beside the shipped models\n",
             f"Made by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). PIAD: reference "
             f"(PyTorch) evaluation on every test crop of its training data, tiled into the model's size, an "
             f"image's score its largest tile's; thresholds from its calibration on validation images. Shipped "
             f"models and U-Nets: their rows of `{shipped_from}` (the same test crops).\n"]
    kept = [r for r in results if "kept_from" in r]
    if kept:
        lines.append("Rows kept from an earlier report (their run folders are gone; `--keep`), each evaluated "
                     "on the same test crops by the command given:\n")
        lines += [f"- {Path(r['model']).parent.name}: `{r['kept_from']['command']}`" for r in kept]
        lines.append("")
    for data in sorted({r["data"] for r in results}):
        rows = [r for r in results if r["data"] == data]
        others = [r for r in shipped if r["data"] == data]
        lines.append(f"## {data} ({rows[0]['test_images']} test crops of {rows[0]['test_size']}x"
                     f"{rows[0]['test_size']}, {rows[0]['defective_images']} defective)\n")
        lines += ["### Image AUROC (one score per test image)\n", "| model | score | image AUROC |",
                  "| --- | --- | --- |"]
        for r in rows:  # each model by its own score, the one its verdict uses (A(x) for rel_perc_l1)
            own = r["train"]["reconstruction_loss"]
            lines.append(f"| {_piad_label(r)} | {ABLATION[own]} | {_cell(r['image_auroc'][own])} |")
        for r in others:
            for name, title in SHIPPED_MAPS.items():
                lines.append(f"| {_shipped_label(r)} | max of {title} | "
                             f"{_cell(r['metrics'].get(name, {}).get('image_auroc'))} |")
        lines += ["", "### Pixel metrics per map\n", "| model | map | pixel AUROC | AUPRO (FPR ≤ 0.3) |",
                  "| --- | --- | --- | --- |"]
        for r in rows:
            for name, title in PIAD_MAPS.items():
                lines.append(f"| {_piad_label(r)} | {title} | {_cell(r['maps'][name]['pixel_auroc'])} | "
                             f"{_cell(r['maps'][name]['aupro_0.3'])} |")
        for r in others:
            for name, title in SHIPPED_MAPS.items():
                metrics = r["metrics"].get(name, {})
                lines.append(f"| {_shipped_label(r)} | {title} | {_cell(metrics.get('pixel_auroc'))} | "
                             f"{_cell(metrics.get('aupro_0.3'))} |")
        lines += ["", "### Ablation (Table 3 in kind): image AUROC by score\n",
                  "Each row one trained model, each column one score of it; a model trained with another "
                  "loss of the ablation (`--reconstruction-loss`) is scored by it, the starred cell (the paper's "
                  "ablation trains and scores with the same loss). In brackets: the 95 % bootstrap interval "
                  "over the test crops.\n",
                  "| model | trained with | " + " | ".join(ABLATION.values()) + " |",
                  "| --- | --- |" + " --- |" * len(ABLATION)]
        for r in rows:
            own = r["train"]["reconstruction_loss"]
            cells = [_cell(r["image_auroc"][k]) + _interval(r["image_auroc_interval"][k]) + (" *" if k == own else "")
                     for k in ABLATION]
            lines.append(f"| {_piad_label(r)} | {own} | " + " | ".join(cells) + " |")
        paired = [d for d in differences if d["data"] == data]
        if paired:
            lines += ["", "Trained with another loss against the rel-perc-L1 model, own score against own score "
                      "(difference of image AUROC, paired 95 % bootstrap interval over the same crops; an "
                      "interval holding 0 does not tell them apart):\n"]
            for d in paired:
                holds = d["interval"] is not None and d["interval"][0] <= 0 <= d["interval"][1]
                lines.append(f"- {Path(d['model']).parent.name} ({d['loss']}) − {Path(d['against']).parent.name}: "
                             f"{d['difference']:+.3f}{_interval(d['interval'])}"
                             + (" (within the draw)" if holds else ""))
        lines += ["", "### PIAD's calibrated verdict on the test crops\n", "| model | TPR | FPR |",
                  "| --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {_piad_label(r)} | {_cell(r['verdict']['tpr'])} | {_cell(r['verdict']['fpr'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help=f"PIAD model.pt files [{', '.join(DEFAULT_RUNS)} that exist]")
    parser.add_argument("--out", default=str(HERE), help="folder for report.json and report.md [reports/piad]")
    parser.add_argument("--shipped", default=SHIPPED,
                        help=f"the report.json the other models' rows come from [{SHIPPED}]")
    parser.add_argument("--test-size", type=int, default=128,
                        help="crop size the test split is drawn at (the shipped models' input size) [128]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")
    parser.add_argument("--keep", metavar="REPORT",
                        help="an earlier report.json whose rows of models not evaluated now are carried over")
    args = parser.parse_args(argv)
    import torch

    from eproj.errors import ConfigError
    from eproj.files import write_atomic

    torch.set_num_threads(args.threads)
    raw = sys.argv[1:] if argv is None else argv
    models = args.models or [p for p in DEFAULT_RUNS if Path(p).is_file()]
    if not models and not args.keep:
        raise SystemExit(f"no PIAD model: none of {', '.join(DEFAULT_RUNS)} exists; pass model.pt paths")
    command = ".venv/bin/python reports/piad/make_report.py" + (" " + shlex.join(raw) if raw else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in models:
        print(f"evaluating {path}", file=sys.stderr)
        results.append(evaluate_model(path, args.test_size))
    if args.keep:
        results = keep_rows(results, Path(args.keep))
    shipped = shipped_rows(Path(args.shipped), {r["data"] for r in results})
    for r in shipped:
        mine = next(p for p in results if p["data"] == r["data"])
        if (r["test_images"], r["defective_images"]) != (mine["test_images"], mine["defective_images"]):
            raise ConfigError(f"{args.shipped}: {r['model']} was tested on {r['test_images']} images "
                              f"({r['defective_images']} defective), this split has {mine['test_images']} "
                              f"({mine['defective_images']}); re-run that report or pass --test-size")
    differences = own_loss_differences(results)
    payload = {"command": command, "models": [r["model"] for r in results], "evaluated": models,
               "shipped_from": args.shipped, "results": results,
               "own_loss_differences": differences,
               "shipped": [{k: r[k] for k in ("model", "family", "data", "train", "metrics")} for r in shipped]}
    write_atomic(out / "report.json", json.dumps(payload, indent=2).encode())
    write_atomic(out / "report.md", markdown(results, shipped, command, args.shipped, differences).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
