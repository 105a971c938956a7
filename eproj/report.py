"""Reports over several models (``eproj report``) and parameter sweeps
(``eproj sweep``): JSON with every metric, and Markdown tables of pixel AUROC
with models (or swept values) as rows and the anomaly maps as columns, the
shape of Tables 1 and 2 of Zimmerer et al."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eproj.errors import ConfigError
from eproj.files import write_atomic
from eproj.predictor_eval import MAPS, evaluate_model

COLUMN_TITLES = {"dssim_reconstruction": "DSSIM recon.", "dssim_projection": "DSSIM proj.", "rec_error": "Rec-Error",
                 "rec_grad": "Rec-grad", "kl_grad": "KL-grad", "elbo_grad": "ELBO-grad", "combi": "Combi",
                 "proj_rec_error": "Proj-Rec-Error", "ensemble": "Ensemble"}


def markdown_table(rows: list[tuple[str, dict[str, Any]]], metric: str = "pixel_auroc") -> str:
    """One row per (label, metrics by map); a map a model lacks shows as —."""
    header = "| model | " + " | ".join(COLUMN_TITLES[m] for m in MAPS) + " |"
    lines = [header, "| --- |" + " --- |" * len(MAPS)]
    for label, metrics in rows:
        cells = []
        for m in MAPS:
            value = metrics.get(m, {}).get(metric)
            cells.append("—" if value is None else f"{value:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(result: dict[str, Any]) -> str:
    regime = result["train"].get("regime") or "plain"
    if regime == "corrupt":
        regime += f" ({result['train'].get('corruption')})"
    path = Path(result["model"])
    name = path.parent.name if path.name == "model.pt" else path.stem
    return f"{name} — {result['data']}, {result['family']}, {regime}"


def write_report(results: list[dict[str, Any]], out: Path, title: str, command: str, name: str = "report",
                 labels: list[str] | None = None) -> None:
    """``out/NAME.json`` (every result) and ``out/NAME.md`` (one table per metric; rows
    labelled by ``labels``, default the model, its data, family and regime)."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps({"command": command, "results": results}, indent=2).encode())
    rows = list(zip(labels or [_label(r) for r in results], (r["metrics"] for r in results)))
    text = (f"# {title}\n\nMade by `{command}`. Each map is scored on the 90 % of the test images the ensemble "
            f"was not fitted on.\n\n## Pixel AUROC\n\n{markdown_table(rows)}\n## AUPRO (FPR ≤ 0.3)\n\n"
            f"{markdown_table(rows, 'aupro_0.3')}\n## Image AUROC (score: the map's maximum)\n\n"
            f"{markdown_table(rows, 'image_auroc')}")
    write_atomic(out / f"{name}.md", text.encode())


def report(models: list[str], out: Path, data: str | None = None, command: str = "",
           threads: int = 0) -> list[dict[str, Any]]:
    """Evaluate every model's maps; write report.json and report.md into ``out``."""
    if not models:
        raise ConfigError("report needs at least one model")
    results = []
    for path in models:
        results.append(evaluate_model(path, data, threads=threads))
        write_report(results, out, "Anomaly maps compared", command)  # after each: nothing lost on interruption
    return results


SWEEPABLE = ("beta", "latent")


def sweep(data: str, family: str, parameter: str, values: list[float], out: Path, steps: int,
          size: int = 128, lr: float = 2e-4, command: str = "", threads: int = 0) -> list[dict[str, Any]]:
    """Train one model per value of ``parameter`` (resumable runs under ``out``), then report them."""
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    if parameter not in SWEEPABLE:
        raise ConfigError(f"sweep parameter must be one of {SWEEPABLE}, got {parameter!r}")
    if parameter == "beta" and family != "vae":
        raise ConfigError(f"a beta sweep needs the vae family, got {family}")
    from eproj.train.data import load_source

    channels = load_source(data, size=size).channels
    results = []
    for value in values:
        options = {parameter: int(value) if parameter == "latent" else float(value)}
        run = out / f"{parameter}-{value:g}"
        model = train(run, ModelConfig(family=family, size=size, channels=channels, **options),
                      TrainConfig(data=data, steps=steps, lr=lr), progress=True)
        result = evaluate_model(model, data, threads=threads)
        result["sweep"] = {parameter: value}
        results.append(result)
        write_sweep(results, out, command)  # after each value: nothing lost on interruption
    return results


def write_sweep(results: list[dict[str, Any]], out: Path, command: str) -> None:
    """``out/sweep.json`` and ``out/sweep.md``, one row per swept value."""
    parameter = next(iter(results[0]["sweep"]))
    labels = [f"{parameter} = {r['sweep'][parameter]:g}" for r in results]
    write_report(results, out, f"{results[0]['family']} on {results[0]['data']}, {parameter} swept", command,
                 "sweep", labels)
