"""Pixel-wise anomaly predictors of the variational families (Zimmerer et al.;
Zhou, Deng & Wu), defined once from their ingredients; NumPy and OpenCV only.

The ingredients of a batch x0 (N, C, H, W) are f(x0) at the encoder mean, the
input gradients of the reconstruction term and of the KL term, and, for
Proj-Rec-Error, the energy projection. The reference computes them with
autograd (``eproj.train.predictors``), the runtime from the step graph's
outputs (``eproj.runtime.predictors``); both hand them to ``predictor_maps``.

The VAE's loss is L = w_rec * Lr + w_kl * KL with the weights of its training
loss (w_rec = 1 / (2 sigma^2) for the fixed-variance VAE, whose Lr is the plain
sum of squares, and 1 for the gamma-VAE; w_kl = beta). Maps, (N, H, W):

- ``rec_error``: (x0 - f(x0))^2, mean over channels;
- ``rec_grad``: |w_rec dLr/dx|, ``kl_grad``: |w_kl dKL/dx|, ``elbo_grad``: |dL/dx|,
  each mean over channels and smoothed by a Gaussian of ``grad_sigma`` pixels;
- ``combi``: kl_grad smoothed by ``combi_sigma`` and normalised to [0, 1] per
  image (divided by its maximum), times rec_error;
- ``proj_rec_error``: (x0 - projection)^2, mean over channels (the projection method).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from eproj.errors import ConfigError

PREDICTORS = ("rec_error", "rec_grad", "kl_grad", "elbo_grad", "combi", "proj_rec_error")
GRADIENT_PREDICTORS = ("rec_grad", "kl_grad", "elbo_grad", "combi")  # need a variational family


@dataclass(frozen=True)
class PredictorConfig:
    """Smoothing of the gradient maps and of the KL map inside ``combi``, in pixels (0: none)."""

    grad_sigma: float = 1.0
    combi_sigma: float = 4.0

    def __post_init__(self) -> None:
        if self.grad_sigma < 0 or self.combi_sigma < 0:
            raise ConfigError(f"smoothing sigmas must be >= 0, got {self.grad_sigma}, {self.combi_sigma}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Ingredients:
    """(N, C, H, W) float arrays; ``kl_grad`` None for non-variational families,
    ``projection`` None when Proj-Rec-Error is not asked for; ``projection_map`` (N, H, W)
    the projection's calibrated anomaly map (each tile's DSSIM map on the scale of its step
    count, ``eproj.decision.map_factors``) where the projection was run, else None."""

    x0: np.ndarray
    reconstruction: np.ndarray
    rec_grad: np.ndarray
    kl_grad: np.ndarray | None
    projection: np.ndarray | None
    rec_weight: float
    kl_weight: float
    projection_map: np.ndarray | None = None


def loss_weights(family: str, beta: float, decoder_variance: float) -> tuple[float, float]:
    """(w_rec, w_kl) of a family's training loss, for Lr as defined in eproj.train.losses."""
    if family == "vae":
        return 1.0 / (2.0 * decoder_variance), beta
    return 1.0, 1.0


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of (N, H, W) maps, mirrored borders."""
    if sigma <= 0:
        return maps
    return np.stack([cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for m in maps])


def _per_pixel(values: np.ndarray) -> np.ndarray:
    return np.abs(values).mean(axis=1).astype(np.float32)


def predictor_maps(ingredients: Ingredients, names: tuple[str, ...] = PREDICTORS,
                   config: PredictorConfig = PredictorConfig()) -> dict[str, np.ndarray]:
    """The maps named in ``names`` (see the module docstring), each (N, H, W) float32."""
    unknown = [n for n in names if n not in PREDICTORS]
    if unknown:
        raise ConfigError(f"unknown predictor(s) {unknown}; known: {PREDICTORS}")
    g = ingredients
    if g.kl_grad is None and any(n in GRADIENT_PREDICTORS for n in names):
        raise ConfigError(f"{[n for n in names if n in GRADIENT_PREDICTORS]} need a variational family (vae, gvae)")
    if "proj_rec_error" in names and g.projection is None:
        raise ConfigError("proj_rec_error needs the projection")
    out: dict[str, np.ndarray] = {}
    rec_error = ((g.x0 - g.reconstruction) ** 2).mean(axis=1).astype(np.float32)
    if "rec_error" in names:
        out["rec_error"] = rec_error
    rec_grad = g.rec_weight * g.rec_grad
    if "rec_grad" in names:
        out["rec_grad"] = smooth(_per_pixel(rec_grad), config.grad_sigma)
    if g.kl_grad is not None:
        kl_grad = g.kl_weight * g.kl_grad
        kl_map = _per_pixel(kl_grad)
        if "kl_grad" in names:
            out["kl_grad"] = smooth(kl_map, config.grad_sigma)
        if "elbo_grad" in names:
            out["elbo_grad"] = smooth(_per_pixel(rec_grad + kl_grad), config.grad_sigma)
        if "combi" in names:
            smoothed = smooth(kl_map, config.combi_sigma)
            peak = smoothed.reshape(len(smoothed), -1).max(axis=1)[:, None, None]
            out["combi"] = (smoothed / np.maximum(peak, 1e-12) * rec_error).astype(np.float32)
    if "proj_rec_error" in names:
        out["proj_rec_error"] = ((g.x0 - g.projection) ** 2).mean(axis=1).astype(np.float32)
    return {n: out[n] for n in names}


# ---------------------------------------------------------------------------
# the ensemble: logistic regression over the predictors as per-pixel features
# ---------------------------------------------------------------------------

def ensemble_features(maps: dict[str, np.ndarray], features: tuple[str, ...]) -> np.ndarray:
    """(pixels, F) float64 feature matrix of (N, H, W) maps, in the order of ``features``."""
    missing = [f for f in features if f not in maps]
    if missing:
        raise ConfigError(f"the ensemble needs the predictor maps {missing}")
    return np.stack([maps[f].astype(np.float64).ravel() for f in features], axis=1)


def ensemble_map(maps: dict[str, np.ndarray], model: dict) -> np.ndarray:
    """The fitted ensemble's anomaly probability per pixel, (N, H, W) float32.

    ``model`` (as stored in a bundle): ``features`` (names), ``mean`` and ``scale``
    (the standardisation), ``coef`` and ``intercept`` of the logistic regression.
    """
    features = tuple(model["features"])
    shape = maps[features[0]].shape
    z = (ensemble_features(maps, features) - np.asarray(model["mean"])) / np.asarray(model["scale"])
    logit = z @ np.asarray(model["coef"], dtype=np.float64) + float(model["intercept"])
    return (1.0 / (1.0 + np.exp(-logit))).reshape(shape).astype(np.float32)
