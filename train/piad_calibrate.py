"""PIAD's model.pt: scores and maps of a trained E/G, their calibration, and evaluation on a test set.

For a tile x (N, C, S, S) in [0, 1] and its reconstruction y = G(E(x)) (``piad_outputs``):

- image scores: ``rel_perc_l1`` = A(x) = ||f~(x) - f~(y)||_1 / ||f~(x)||_1 (Eqs. 1, 3-4, the
  paper's score), and for the ablation in kind of the paper's Table 3: ``perc_l1`` =
  mean |f~(x) - f~(y)| (normalised features, L1, no division), ``perc`` = mean (f(x) - f(y))^2
  (raw features, MSE: the perceptual loss) and ``l2`` = mean (x - y)^2 over the pixels;
- pixel maps (eproj's extension): ``feature`` = |f~(x) - f~(y)| summed over channels and
  bilinearly upsampled to S x S, ``dssim`` = DSSIM(x, y).

The calibration, on the same validation images as the other families
(``eproj.train.calibrate.validation_sets``: normal crops and their mirrors, and for texture
sources the same crops with synthetic defects): the score threshold is the ``quantile`` (0.99)
of A over the normal validation tiles, each map's pixel threshold the same quantile of its
values on them; the verdict (``eproj.runtime.piad.PIADDecision``) adds the smallest mask
region no normal validation tile reaches and the range of the tiles' pixel std over normal
validation and training tiles. The validation figures (image AUROC per score, pixel AUROC and
AUPRO per map, on the synthetic defects) are stored beside them.

A frame larger than the model is tiled side by side (``eproj.tiles``): its score is its
largest tile's, its maps are stitched back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eproj.decision import frame_range, largest_region, tile_std
from eproj.errors import CheckpointError, ConfigError, DataError
from eproj.piad_decision import PIAD_MAPS, PIADDecision
from eproj.train.calibrate import RANGE_MARGIN, validation_sets
from eproj.train.checkpoint import FORMAT_VERSION, load_payload, save_atomic
from eproj.train.data import DataSource, TestSample, load_source, recorded_fit, tile, to_batch, untile
from eproj.train.losses import dssim_map
from eproj.train.metrics import all_metrics, aupro, image_auroc, pixel_auroc
from eproj.train.perceptual import (RECONSTRUCTION_LOSSES, FeatureStats, build_feature_network, feature_distances,
                                    feature_record, reconstruction_distance)
from eproj.train.piad import PIAD_CHECKPOINT_FORMAT, piad_from_checkpoint
from eproj.train.piad_networks import PIAD, PIADConfig

PIAD_MODEL_FORMAT = "eproj-piad-model"
PIAD_SCORES = RECONSTRUCTION_LOSSES  # the paper's score first, then the ablation's
PIAD_SCORE = "rel_perc_l1"  # A(x); a model trained with another loss of the ablation is scored by it


# --------------------------------------------------------------------------------------
# scores and maps
# --------------------------------------------------------------------------------------

@torch.no_grad()
def piad_outputs(model: PIAD, network: nn.Module, stats: FeatureStats, images: np.ndarray,
                 batch: int = 32) -> dict[str, np.ndarray]:
    """Scores and maps of (N, C, S, S) float32 tiles in [0, 1] (see the module docstring):
    name -> (N,) float64 for each of ``PIAD_SCORES``, (N, S, S) float32 for each of ``PIAD_MAPS``,
    and ``reconstruction`` (N, C, S, S) float32."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in PIAD_SCORES + PIAD_MAPS + ("reconstruction",)}
    mean, std = stats.mean.view(1, -1, 1, 1), stats.std.view(1, -1, 1, 1)
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch], np.float32))
        y = model.reconstruct(x)
        fx, fy = network(x), network(y)
        if fx.shape[1] != mean.shape[1]:
            raise ConfigError(f"feature statistics have {mean.shape[1]} channels, the network gives {fx.shape[1]}")
        for name, value in feature_distances(fx, fy, stats).items():
            out[name].append(value.double())
        out["l2"].append(reconstruction_distance("l2", network, stats, x, y).double())
        diff = ((fx - mean) / std - (fy - mean) / std).abs()
        out["feature"].append(F.interpolate(diff.sum(1, keepdim=True), size=x.shape[-2:], mode="bilinear",
                                            align_corners=False)[:, 0])
        out["dssim"].append(dssim_map(x, y))
        out["reconstruction"].append(y)
    return {k: torch.cat(v).numpy() if v else np.zeros((0,)) for k, v in out.items()}


# --------------------------------------------------------------------------------------
# the trained model: checkpoint -> feature network, model.pt
# --------------------------------------------------------------------------------------

def feature_network_of(record: dict[str, Any], path: str | None, where: Path) -> nn.Module:
    """The frozen feature network a run recorded (``eproj.train.perceptual.feature_record``),
    rebuilt from its weight file (``path``; None: the installed EfficientNet-Lite0 package's) and
    checked against the recorded SHA-256. CheckpointError when the file is gone or differs."""
    kind, tap = record.get("network"), record.get("tap", "stage3")
    try:
        now = feature_record(kind, path, tap if kind != "vgg19" else "stage3")
    except (ConfigError, CheckpointError) as exc:
        raise CheckpointError(f"{where} was trained with the feature network {record}; it cannot be rebuilt "
                              f"({exc})") from None
    if now.get("sha256") != record.get("sha256"):
        raise CheckpointError(f"{where} was trained with the {kind} weights {record.get('weights')} (SHA-256 "
                              f"{str(record.get('sha256'))[:12]}...); {path or 'the installed file'} has "
                              f"{now['sha256'][:12]}...")
    return build_feature_network(kind, path, tap if kind != "vgg19" else "stage3")


class TrainedPIAD:
    """A loaded PIAD ``model.pt``: E/G (eval mode, float32), the feature network, mu/sigma,
    the calibration and the training record."""

    def __init__(self, model: PIAD, network: nn.Module, stats: FeatureStats, calibration: dict[str, Any],
                 train: dict[str, Any], features: dict[str, Any], path: Path, step: int) -> None:
        self.model, self.network, self.stats = model, network, stats
        self.calibration, self.train, self.features, self.path, self.step = calibration, train, features, path, step

    @property
    def config(self) -> PIADConfig:
        return self.model.config

    @property
    def score(self) -> str:
        """The image score of the verdict (one of ``PIAD_SCORES``)."""
        return str(self.calibration.get("score", PIAD_SCORE))

    @property
    def decision(self) -> PIADDecision:
        return PIADDecision.from_dict(self.calibration["decision"])

    def outputs(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        return piad_outputs(self.model, self.network, self.stats, tiles)


def is_piad_file(path: str | Path) -> bool:
    """Whether ``path`` (a file; a run folder: its checkpoint.pt or model.pt) holds a PIAD payload."""
    path = Path(path)
    if path.is_dir():
        path = path / ("model.pt" if (path / "model.pt").is_file() else "checkpoint.pt")
    if not path.is_file():
        return False
    for fmt in (PIAD_MODEL_FORMAT, PIAD_CHECKPOINT_FORMAT):
        try:
            load_payload(path, fmt)
            return True
        except CheckpointError:
            continue
    return False


def _weights(state: dict[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    return {k: (v.half() if half else v.float()) for k, v in state.items()}


def write_piad_model(run_dir: str | Path, data: str | None = None, progress: bool = True) -> Path:
    """Calibrate the PIAD run's latest checkpoint (on ``data``, default the run's) and write
    ``model.pt`` beside it: E/G weights (float16 when the run asked, calibrated as shipped), mu and
    sigma, the feature record and the calibration."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    model, stats, features, step = piad_from_checkpoint(ckpt)
    payload = load_payload(ckpt, PIAD_CHECKPOINT_FORMAT)
    record = dict(payload.get("data") or {})
    if not record.get("data"):
        raise CheckpointError(f"{ckpt} does not record its training data (trained outside `eproj train`); "
                              f"train it with `eproj train --model piad`")
    half = record.get("weights") == "float16"
    if half:
        model.load_state_dict(_weights({k: v.half() for k, v in model.state_dict().items()}, False))
    network = feature_network_of(features, record.get("feature_weights"), ckpt)
    source = load_source(data or record["data"], size=model.config.size, seed=int(payload["train"]["seed"]),
                         fit=recorded_fit(record))
    if source.channels != model.config.channels:
        raise DataError(f"{source.spec} has {source.channels}-channel images; the model has {model.config.channels}")
    if progress:
        print(f"calibrate piad: scoring the validation images of {source.spec}")
    calibration = calibrate_piad(model, network, stats, source,
                                 score=payload["train"].get("reconstruction_loss", PIAD_SCORE))
    out = run_dir / "model.pt"
    save_atomic({"format": PIAD_MODEL_FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                 "train": {**payload["train"], **record}, "step": step, "features": features,
                 "stats": stats.to_dict(), "encoder": _weights(model.encoder.state_dict(), half),
                 "generator": _weights(model.generator.state_dict(), half), "calibration": calibration}, out)
    return out


def load_piad_model(path: str | Path) -> TrainedPIAD:
    """Load a PIAD ``model.pt`` (or the one in a run folder) with its feature network."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    payload = load_payload(path, PIAD_MODEL_FORMAT)
    try:
        config = PIADConfig.from_dict(dict(payload["config"]))
        model = PIAD(config)
        model.encoder.load_state_dict(_weights(payload["encoder"], False))
        model.generator.load_state_dict(_weights(payload["generator"], False))
        stats = FeatureStats.from_dict(payload["stats"])
        calibration = dict(payload["calibration"])
        PIADDecision.from_dict(calibration["decision"])
    except (KeyError, RuntimeError, ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} is not a valid PIAD model ({type(exc).__name__}: {exc})") from None
    for name, tensor in model.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight {name} holds NaN or Inf values")
    model.eval()
    train = dict(payload.get("train", {}))
    features = dict(payload["features"])
    network = feature_network_of(features, train.get("feature_weights"), path)
    return TrainedPIAD(model, network, stats, calibration, train, features, path, int(payload.get("step", 0)))


# --------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------

def _map_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float | None]:
    return {"pixel_auroc": pixel_auroc(list(maps), list(masks)), "aupro": aupro(list(maps), list(masks), 0.3)}


def calibrate_piad(model: PIAD, network: nn.Module, stats: FeatureStats, source: DataSource,
                   quantile: float = 0.99, n_train: int = 256, score: str = PIAD_SCORE) -> dict[str, Any]:
    """The calibration dict of a PIAD model.pt (see the module docstring); ``score``: the image
    score of the verdict, A(x) = rel_perc_l1 or the reconstruction loss the model was trained with."""
    normal, defects, masks = validation_sets(source)
    out_n = piad_outputs(model, network, stats, normal)
    segmentation = {name: float(np.quantile(out_n[name], quantile)) for name in PIAD_MAPS}
    score_threshold = float(np.quantile(out_n[score], quantile))
    decision_map = "feature"
    area = max(largest_region(m > segmentation[decision_map]) for m in out_n[decision_map]) + 1
    train_std = tile_std(source.train_sample(n_train, seed=12345))
    decision = PIADDecision(score_threshold, segmentation[decision_map], decision_map, int(area),
                            frame_range({"x0_std": np.concatenate([tile_std(normal), train_std])}, RANGE_MARGIN))
    validation: dict[str, Any] = {"image_auroc": None, "maps": None}
    if len(defects):
        out_d = piad_outputs(model, network, stats, defects)
        labels = np.r_[np.zeros(len(normal), bool), np.ones(len(defects), bool)]
        validation["image_auroc"] = {name: image_auroc(np.r_[out_n[name], out_d[name]], labels)
                                     for name in PIAD_SCORES}
        all_masks = np.concatenate([np.zeros((len(normal),) + masks.shape[1:], bool), masks])
        validation["maps"] = {name: _map_metrics(np.concatenate([out_n[name], out_d[name]]), all_masks)
                              for name in PIAD_MAPS}
    return {"family": "piad", "quantile": quantile, "score": score, "score_threshold": score_threshold,
            "segmentation": segmentation, "decision": decision.to_dict(), "input": source.input_record(),
            "validation_images": len(normal), "validation_defect_images": len(defects),
            "validation": validation,
            "normal_scores": {name: [float(np.min(out_n[name])), float(np.median(out_n[name])),
                                     float(np.max(out_n[name]))] for name in PIAD_SCORES}}


# --------------------------------------------------------------------------------------
# evaluation on a test set
# --------------------------------------------------------------------------------------

def piad_on_samples(trained: TrainedPIAD, samples: list[TestSample]) -> list[dict[str, Any]]:
    """Per test image (any size of at least the model's; tiled side by side): ``scores`` name ->
    the largest tile score for each of ``PIAD_SCORES``, ``maps`` name -> (H, W), ``defect`` and
    ``reason`` (the calibrated verdict)."""
    size, channels = trained.config.size, trained.config.channels
    tiles, owners = [], []
    for i, s in enumerate(samples):
        if s.image.ndim != 3 or s.image.shape[2] != channels:
            raise DataError(f"test image {s.name} has shape {s.image.shape}; the model expects {channels} channel(s)")
        parts = tile(s.image, size)
        tiles += parts
        owners += [i] * len(parts)
    batch = to_batch(tiles)
    out = trained.outputs(batch)
    std = tile_std(batch)
    owners_arr = np.asarray(owners)
    decision = trained.decision
    results = []
    for i, s in enumerate(samples):
        idx = np.nonzero(owners_arr == i)[0]
        maps = {name: untile(out[name][idx], s.image.shape[:2]) for name in PIAD_MAPS}
        scores = {name: float(out[name][idx].max()) for name in PIAD_SCORES}
        defect, reason = decision.verdict(scores[trained.score], maps[decision.map] > decision.pixel_threshold,
                                          std[idx])
        results.append({"sample": s, "scores": scores, "maps": maps, "defect": defect, "reason": reason})
    return results


def save_piad_maps(results: list[dict[str, Any]], decision: PIADDecision, folder: Path) -> None:
    """Write each image's decision map (float32 .npy) and its mask (.png), named after it."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for r in results:
        name = r["sample"].name
        np.save(folder / f"{name}.npy", r["maps"][decision.map].astype(np.float32))
        mask = (r["maps"][decision.map] > decision.pixel_threshold).astype(np.uint8) * 255
        if not cv2.imwrite(str(folder / f"{name}_mask.png"), mask):
            raise DataError(f"cannot write {folder / (name + '_mask.png')}")


def evaluate_piad(trained: TrainedPIAD, data: str | None = None, maps_dir: Path | None = None,
                  test_size: int | None = None) -> dict[str, Any]:
    """Image AUROC of A(x) (the paper's protocol: the score of every test image against its
    label) and of each ablation score, and every pixel metric of each map, on the test split of
    ``data`` (default the model's training data). The JSON shape follows ``eproj eval``'s:
    ``metrics`` map kind -> ``eproj.train.metrics.all_metrics`` (its image AUROC: the model's score),
    ``metrics["image_scores"]`` score -> image AUROC, and per-image rows. ``maps_dir``: also
    write each image's decision map and mask there (``save_piad_maps``). ``test_size``: draw the
    test split at this crop size (tiled data; default the model's), e.g. the size the other
    families were tested at, so that every model meets the same test crops."""
    data = data or trained.train.get("data")
    if not data:
        raise ConfigError(f"{trained.path} does not record its training data; pass --data")
    fit = recorded_fit(trained.train)
    size = test_size or trained.config.size
    if size != trained.config.size and (fit != "tile" or size < trained.config.size):
        raise ConfigError(f"a test split drawn at size {size} is for tiled data and sizes of at least the model's "
                          f"{trained.config.size}; {trained.path} was trained with fit {fit}")
    source = load_source(data, size=size, fit=fit)
    if source.channels != trained.config.channels:
        raise DataError(f"{data} has {source.channels}-channel images; the model expects {trained.config.channels}")
    results = piad_on_samples(trained, source.test())
    if maps_dir is not None:
        save_piad_maps(results, trained.decision, maps_dir)
    labels = np.array([r["sample"].label for r in results])
    masks = [r["sample"].mask for r in results]
    score = np.array([r["scores"][trained.score] for r in results])
    metrics: dict[str, Any] = {name: all_metrics([r["maps"][name] for r in results], masks, score, labels,
                                                 trained.calibration["segmentation"][name]) for name in PIAD_MAPS}
    metrics["image_scores"] = {name: image_auroc(np.array([r["scores"][name] for r in results]), labels)
                               for name in PIAD_SCORES}
    flagged = np.array([r["defect"] for r in results])
    metrics["verdict"] = {"tpr": float(flagged[labels == 1].mean()) if (labels == 1).any() else None,
                          "fpr": float(flagged[labels == 0].mean()) if (labels == 0).any() else None}
    return {"model": str(trained.path), "family": "piad", "data": data, "method": "reconstruction",
            "test_size": size, "image_score": trained.score, "step": trained.step, "features": trained.features,
            "metrics": metrics,
            "images": [{"name": r["sample"].name, "defect": r["sample"].defect, "label": r["sample"].label,
                        "score": r["scores"][trained.score], "scores": r["scores"], "flagged": r["defect"],
                        "reason": r["reason"]} for r in results]}
