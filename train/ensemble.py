"""Fitting the predictor ensemble (scikit-learn's logistic regression) on a small
labelled split of the test images; ``eproj.predictors.ensemble_map`` applies it."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from eproj.errors import DataError
from eproj.predictors import ensemble_features


def labelled_split(n: int, fraction: float = 0.1, seed: int = 0,
                   labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, evaluation indices) of n test images: a seeded ``fraction`` to fit on
    (at least one), the rest to evaluate; disjoint. With ``labels``, the fit part holds
    at least one defective image (the next one in the seeded order if the draw had none)."""
    order = list(np.random.default_rng(seed).permutation(n))
    k = max(1, int(round(fraction * n)))
    fit = order[:k]
    if labels is not None and not any(labels[i] for i in fit):
        extra = next((i for i in order[k:] if labels[i]), None)
        if extra is not None:
            fit.append(extra)
    rest = [i for i in order if i not in fit]
    return np.sort(np.asarray(fit, dtype=np.int64)), np.sort(np.asarray(rest, dtype=np.int64))


def fit_ensemble(maps: dict[str, np.ndarray], masks: np.ndarray, features: tuple[str, ...],
                 max_pixels: int = 200_000, seed: int = 0) -> dict:
    """Fit on (N, H, W) predictor maps against (N, H, W) bool ground truth.

    Pixels are subsampled to ``max_pixels`` (seeded); features are standardised.
    Returns the JSON-able model ``ensemble_map`` reads.
    """
    x = ensemble_features(maps, features)
    y = masks.ravel().astype(np.int64)
    if y.min() == y.max():
        raise DataError("the ensemble's labelled split has pixels of one class only; "
                        "it needs defective and normal pixels")
    if len(y) > max_pixels:
        keep = np.random.default_rng(seed).choice(len(y), max_pixels, replace=False)
        x, y = x[keep], y[keep]
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    regression = LogisticRegression(max_iter=1000).fit((x - scaler.mean_) / scale, y)
    return {"features": list(features), "mean": scaler.mean_.tolist(), "scale": scale.tolist(),
            "coef": regression.coef_[0].tolist(), "intercept": float(regression.intercept_[0]),
            "fitted_on_pixels": int(len(y)), "positive_fraction": float(y.mean())}
