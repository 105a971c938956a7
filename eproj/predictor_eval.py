"""Evaluation of every pixel-wise anomaly map of a model on one test set:
the DSSIM maps of the reconstruction and of the projection, the predictors of
``eproj.predictors`` and their ensemble.

Maps come from the runtime (the model exported to a bundle: its step graph for
the predictors' ingredients, the Inspector for the projection), which the
tests hold to the reference. The ensemble is fitted on a seeded 10 % of the
test images (the paper's protocol), and *every* map is scored on the other
90 % only, so all rows of a report compare on the same images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import eproj.cpp_ext as kernels
from eproj.predictors import PREDICTORS, PredictorConfig, ensemble_map, predictor_maps
from eproj.train.checkpoint import TrainedModel, load_model
from eproj.train.data import load_source, recorded_fit, tile, to_batch, untile
from eproj.train.ensemble import fit_ensemble, labelled_split
from eproj.train.evaluate import image_score
from eproj.train.metrics import aupro, best_f1, fpr_at_tpr, image_auroc, pixel_auroc

MAPS = ("dssim_reconstruction", "dssim_projection") + PREDICTORS + ("ensemble",)


def available_maps(family: str) -> tuple[str, ...]:
    """The maps a family has: the gradient predictors need a variational family."""
    variational = family in ("vae", "gvae")
    names = [m for m in MAPS if variational or m not in ("rec_grad", "kl_grad", "elbo_grad", "combi")]
    return tuple(names)


def _metrics(maps: list[np.ndarray], masks: list[np.ndarray | None], labels: np.ndarray) -> dict[str, Any]:
    f1 = best_f1(maps, masks)
    return {"pixel_auroc": pixel_auroc(maps, masks), "aupro_0.3": aupro(maps, masks, 0.3),
            "image_auroc": image_auroc(np.array([image_score(m) for m in maps]), labels),
            "fpr_at_tpr_0.99": fpr_at_tpr(maps, masks, 0.99), "best_f1": None if f1 is None else f1[0]}


def tile_maps(trained: TrainedModel, tiles: np.ndarray, bundle: Path, config: PredictorConfig,
              batch: int = 16, progress: bool = True, threads: int = 0) -> dict[str, np.ndarray]:
    """Every map but the ensemble for (T, C, S, S) tiles, (T, S, S) each, on the runtime
    (``threads`` CPU threads, 0: every core)."""
    from eproj.runtime.predictors import StepIngredients

    names = tuple(m for m in available_maps(trained.config.family) if m in PREDICTORS)
    ingredients = StepIngredients(bundle, threads=threads)
    out: dict[str, list[np.ndarray]] = {m: [] for m in ("dssim_reconstruction", "dssim_projection") + names}
    for start in tqdm(range(0, len(tiles), batch), desc=f"maps {trained.config.family}", unit="batch",
                      disable=not progress, leave=False):
        x0 = np.ascontiguousarray(tiles[start:start + batch], dtype=np.float32)
        g = ingredients(x0, with_projection=True)
        for name, value in predictor_maps(g, names, config).items():
            out[name].append(value)
        out["dssim_reconstruction"].append(kernels.dssim_map(x0, np.ascontiguousarray(g.reconstruction)).map)
        out["dssim_projection"].append(g.projection_map)  # the runtime's map, as the inspector reports it
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_maps(trained: TrainedModel, data: str, config: PredictorConfig = PredictorConfig(),
                  fit_fraction: float = 0.1, seed: int = 0, progress: bool = True, threads: int = 0) -> dict[str, Any]:
    """Metrics of every map of ``trained`` on the test set of ``data`` (see the module docstring)."""
    from eproj.export.onnx_graphs import export_bundle

    source = load_source(data, size=trained.config.size, fit=recorded_fit(trained.train))
    samples = source.test()
    size = trained.config.size
    tiles, owners = [], []
    for i, s in enumerate(samples):
        parts = tile(s.image, size)
        tiles += parts
        owners += [i] * len(parts)
    with tempfile.TemporaryDirectory() as folder:
        export_bundle(trained, folder)
        per_tile = tile_maps(trained, to_batch(tiles), Path(folder), config, progress=progress, threads=threads)
    owners_arr = np.asarray(owners)
    per_image = {name: [untile(m[owners_arr == i], s.image.shape[:2]) for i, s in enumerate(samples)]
                 for name, m in per_tile.items()}
    masks = [s.mask for s in samples]
    labels = np.array([s.label for s in samples])
    fit, rest = labelled_split(len(samples), fit_fraction, seed, labels)
    features = tuple(n for n in available_maps(trained.config.family) if n in PREDICTORS)
    fit_masks = np.stack([masks[i] if masks[i] is not None else np.zeros(samples[i].image.shape[:2], bool)
                          for i in fit])
    ensemble = fit_ensemble({n: np.stack([per_image[n][i] for i in fit]) for n in features}, fit_masks, features,
                            seed=seed)
    per_image["ensemble"] = [ensemble_map({n: per_image[n][i][None] for n in features}, ensemble)[0]
                             for i in range(len(samples))]
    metrics = {name: _metrics([per_image[name][i] for i in rest], [masks[i] for i in rest], labels[rest])
               for name in available_maps(trained.config.family)}
    return {"model": str(trained.path), "family": trained.config.family, "data": data,
            "train": {k: trained.train.get(k) for k in ("steps", "regime", "corruption")},
            "predictor_config": config.to_dict(), "ensemble": ensemble,
            "split": {"fit": fit.tolist(), "evaluate": int(len(rest)), "fit_fraction": fit_fraction, "seed": seed},
            "metrics": metrics}


def evaluate_model(path: str | Path, data: str | None = None, **kwargs: Any) -> dict[str, Any]:
    trained = load_model(path)
    return evaluate_maps(trained, data or trained.train["data"], **kwargs)
