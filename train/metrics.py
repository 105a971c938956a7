"""Localisation and detection metrics.

Pixel metrics pool the pixels of all images that have a ground-truth mask:

- ``pixel_auroc``: ROC AUC of map values against mask pixels;
- ``aupro``: the area under the per-region-overlap curve up to a false positive
  rate of 0.3, divided by 0.3. PRO(t) is the mean, over the connected regions of
  all ground-truth masks, of the fraction of each region above threshold t. It is
  computed exactly as a weighted ROC: each defect pixel weighs 1 / (region size x
  number of regions), so the weighted true positive rate is PRO;
- ``fpr_at_tpr``: the smallest false positive rate reaching a true positive rate;
- ``best_f1``: the best F1 over all thresholds;
- ``iou``: intersection over union of a thresholded prediction and the truth.

``image_auroc`` ranks images by their score. ROC and PR curves come from scikit-learn.
``image_auroc_interval`` and ``auroc_difference_interval`` give percentile bootstrap
intervals (images resampled with replacement within each class) for an image AUROC and for
the difference of two scores' AUROCs on the same images: on a few dozen test images an AUROC
moves by several hundredths from the draw alone.

A metric the data cannot define is None (null in the JSON reports), never 0:
pixel metrics need ground-truth masks with defect pixels (and pixels without),
``image_auroc`` needs good and defective images. ``all_metrics`` says why in
``null_reasons``.
"""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve


def _pool(maps: list[np.ndarray], masks: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    values, truth = [], []
    for amap, mask in zip(maps, masks):
        if mask is None:
            continue
        if amap.shape != mask.shape:
            raise ValueError(f"map of shape {amap.shape} and mask of shape {mask.shape} differ")
        values.append(amap.ravel())
        truth.append(mask.ravel().astype(bool))
    if not values:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(values), np.concatenate(truth)


def _both_classes(truth: np.ndarray) -> bool:
    return truth.size > 0 and bool(truth.any()) and not bool(truth.all())


def pixel_auroc(maps: list[np.ndarray], masks: list[np.ndarray | None]) -> float | None:
    """ROC AUC over all pixels with ground truth; None when only one class is present."""
    values, truth = _pool(maps, masks)
    return float(roc_auc_score(truth, values)) if _both_classes(truth) else None


def pro_curve(maps: list[np.ndarray], masks: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, pro) arrays of the per-region-overlap curve; None without defect regions."""
    values, weights, truth = [], [], []
    regions = []
    for amap, mask in zip(maps, masks):
        if mask is None:
            continue
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions.append((amap, mask.astype(bool), labels, count - 1))
    n_regions = sum(r[3] for r in regions)
    if n_regions == 0:
        return None
    for amap, mask, labels, count in regions:
        sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
        w = np.where(mask, 1.0 / (np.maximum(sizes[labels], 1) * n_regions), 1.0)
        values.append(amap.ravel())
        weights.append(w.ravel())
        truth.append(mask.ravel())
    truth_all = np.concatenate(truth)
    if truth_all.all():
        return None
    fpr, tpr, _ = roc_curve(truth_all, np.concatenate(values), sample_weight=np.concatenate(weights))
    return fpr, tpr


def aupro(maps: list[np.ndarray], masks: list[np.ndarray | None], fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit]."""
    curve = pro_curve(maps, masks)
    if curve is None:
        return None
    fpr, pro = curve
    pro_at_limit = float(np.interp(fpr_limit, fpr, pro))
    keep = fpr <= fpr_limit
    xs = np.concatenate([fpr[keep], [fpr_limit]])
    ys = np.concatenate([pro[keep], [pro_at_limit]])
    return float(np.trapezoid(ys, xs) / fpr_limit)


def fpr_at_tpr(maps: list[np.ndarray], masks: list[np.ndarray | None], tpr_target: float) -> float | None:
    """Smallest pixel false positive rate at which the true positive rate reaches ``tpr_target``."""
    values, truth = _pool(maps, masks)
    if not _both_classes(truth):
        return None
    fpr, tpr, _ = roc_curve(truth, values)
    return float(fpr[np.searchsorted(tpr, tpr_target, side="left")])


def best_f1(maps: list[np.ndarray], masks: list[np.ndarray | None]) -> tuple[float, float] | None:
    """(best F1, the threshold giving it) over all pixel thresholds."""
    values, truth = _pool(maps, masks)
    if not _both_classes(truth):
        return None
    precision, recall, thresholds = precision_recall_curve(truth, values)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    i = int(np.argmax(f1[:-1]))
    return float(f1[i]), float(thresholds[i])


def iou(maps: list[np.ndarray], masks: list[np.ndarray | None], threshold: float) -> float | None:
    """IoU of (map > threshold) and the masks, pooled over images; None when the masks mark
    no defect pixel (the IoU of any prediction would then be 0 or undefined, and say nothing)."""
    values, truth = _pool(maps, masks)
    if not truth.any():
        return None
    pred = values > threshold
    return float(np.logical_and(pred, truth).sum() / np.logical_or(pred, truth).sum())


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    labels = np.asarray(labels).astype(bool)
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else None


def _stratified_resamples(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) image indices, each class drawn with replacement to its own count."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels), np.flatnonzero(~labels)]
    return np.concatenate([g[rng.integers(0, len(g), (resamples, len(g)))] for g in groups], axis=1)


def _checked_interval_inputs(scores: list[np.ndarray], labels: np.ndarray, confidence: float,
                             resamples: int) -> np.ndarray:
    labels = np.asarray(labels).astype(bool)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one value per image, got shape {labels.shape}")
    for s in scores:
        if np.shape(s) != labels.shape:
            raise ValueError(f"scores must be one value per image ({labels.shape}), got shape {np.shape(s)}")
        if not np.isfinite(s).all():
            raise ValueError("scores must be finite to rank them; got NaN or infinity")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100 for a percentile interval, got {resamples}")
    return labels


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def image_auroc_interval(scores: np.ndarray, labels: np.ndarray, confidence: float = 0.95,
                         resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``image_auroc(scores, labels)``; None without both classes."""
    labels = _checked_interval_inputs([scores], labels, confidence, resamples)
    if not _both_classes(labels):
        return None
    scores = np.asarray(scores, np.float64)
    draws = _stratified_resamples(labels, resamples, seed)
    return _percentiles(np.array([roc_auc_score(labels[i], scores[i]) for i in draws]), confidence)


def auroc_difference_interval(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray,
                              confidence: float = 0.95, resamples: int = 2000,
                              seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of image_auroc(a) - image_auroc(b), both scores of the same
    images resampled together (paired); None without both classes. An interval that holds 0
    does not tell the two apart on these images."""
    labels = _checked_interval_inputs([scores_a, scores_b], labels, confidence, resamples)
    if not _both_classes(labels):
        return None
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    draws = _stratified_resamples(labels, resamples, seed)
    return _percentiles(np.array([roc_auc_score(labels[i], a[i]) - roc_auc_score(labels[i], b[i])
                                  for i in draws]), confidence)


PIXEL_METRICS = ("pixel_auroc", "aupro_0.3", "fpr_at_tpr_0.99", "fpr_at_tpr_0.995", "best_f1",
                 "best_f1_threshold", "iou")


def null_reasons(masks: list[np.ndarray | None], labels: np.ndarray) -> dict[str, str]:
    """Why the pixel metrics and image AUROC cannot be computed on this test set: keys
    "pixel" and "image", present only where they cannot."""
    reasons = {}
    given = [m for m in masks if m is not None]
    if not given:
        reasons["pixel"] = "no test image has a ground-truth mask"
    elif not any(m.any() for m in given):
        reasons["pixel"] = "the ground-truth masks mark no defect pixel (no defective test image has a mask)"
    elif all(m.all() for m in given):
        reasons["pixel"] = "every ground-truth pixel is a defect"
    labels = np.asarray(labels).astype(bool)
    if not _both_classes(labels):
        reasons["image"] = ("the test set has only defective images" if labels.size and labels.all()
                            else "the test set has no defective image" if labels.size else "the test set is empty")
    return reasons


def all_metrics(maps: list[np.ndarray], masks: list[np.ndarray | None], scores: np.ndarray,
                labels: np.ndarray, threshold: float) -> dict:
    """Every metric of one kind of map, for the JSON reports; ``null_reasons`` maps each
    metric that is None to why."""
    f1 = best_f1(maps, masks)
    metrics = {
        "pixel_auroc": pixel_auroc(maps, masks),
        "aupro_0.3": aupro(maps, masks, 0.3),
        "image_auroc": image_auroc(scores, labels),
        "fpr_at_tpr_0.99": fpr_at_tpr(maps, masks, 0.99),
        "fpr_at_tpr_0.995": fpr_at_tpr(maps, masks, 0.995),
        "best_f1": None if f1 is None else f1[0],
        "best_f1_threshold": None if f1 is None else f1[1],
        "iou": iou(maps, masks, threshold),
        "threshold": float(threshold),
    }
    why = null_reasons(masks, labels)
    metrics["null_reasons"] = {name: why.get("image" if name == "image_auroc" else "pixel", "undefined on this data")
                               for name in PIXEL_METRICS + ("image_auroc",) if metrics[name] is None}
    return metrics
