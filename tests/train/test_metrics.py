import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from eproj.train import metrics


def test_pixel_auroc_hand_case_and_masks_without_truth_are_skipped():
    maps = [np.array([[0.1, 0.4], [0.35, 0.8]]), np.array([[9.0, 9.0], [9.0, 9.0]])]
    masks = [np.array([[0, 0], [1, 1]], bool), None]
    # positives 0.35, 0.8; negatives 0.1, 0.4: 3 of 4 pairs ordered correctly
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(0.75)


def test_pixel_auroc_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    maps = [rng.random((16, 16)) for _ in range(4)]
    masks = [rng.random((16, 16)) < 0.2 for _ in range(4)]
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected)


def test_single_class_gives_none():
    maps = [np.random.rand(4, 4)]
    assert metrics.pixel_auroc(maps, [np.zeros((4, 4), bool)]) is None
    assert metrics.aupro(maps, [np.zeros((4, 4), bool)]) is None
    assert metrics.image_auroc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def test_pro_curve_is_the_mean_region_overlap():
    # two regions: a 1-pixel one (score 0.9) and a 3-pixel one (scores 0.8, 0.2, 0.2)
    amap = np.array([[0.9, 0.0, 0.8, 0.2, 0.2, 0.1, 0.3, 0.05]])
    mask = np.array([[1, 0, 1, 1, 1, 0, 0, 0]], bool)
    fpr, pro = metrics.pro_curve([amap], [mask])
    # at threshold 0.8: region A fully covered (1), region B 1/3 -> PRO = 2/3, no false positive
    at = np.searchsorted(fpr, 0.0, side="right") - 1
    assert pro[at] == pytest.approx(2 / 3)
    assert pro[-1] == pytest.approx(1.0) and fpr[-1] == pytest.approx(1.0)


def test_aupro_perfect_and_hand_computed():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True
    perfect = mask.astype(float)
    assert metrics.aupro([perfect], [mask]) == pytest.approx(1.0)
    # region detected only at scores that also flag every normal pixel: PRO = 0 until FPR = 1
    inverted = 1.0 - mask.astype(float)
    assert metrics.aupro([inverted], [mask]) == pytest.approx(0.0)
    # half the region above every normal pixel, half below all of them:
    # PRO = 0.5 over [0, 0.3], so the normalised area is 0.5
    half = np.full((10, 10), 0.5)
    half[2:4, 2] = 1.0
    half[2:4, 3] = 0.0
    assert metrics.aupro([half], [mask]) == pytest.approx(0.5)


def test_fpr_at_tpr_best_f1_iou_hand_cases():
    amap = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    mask = np.array([[1, 0, 1, 0, 0]], bool)
    # TPR reaches 1 at threshold 0.7, where 1 of 3 negatives is above: FPR 1/3
    assert metrics.fpr_at_tpr([amap], [mask], 0.99) == pytest.approx(1 / 3)
    f1, threshold = metrics.best_f1([amap], [mask])
    # threshold 0.9: P=1, R=.5, F1=2/3; threshold 0.7: P=2/3, R=1, F1=0.8
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.7)
    # prediction > 0.65: pixels 0, 1, 2 -> intersection 2, union 3
    assert metrics.iou([amap], [mask], 0.65) == pytest.approx(2 / 3)


def test_image_auroc_and_all_metrics_keys():
    assert metrics.image_auroc(np.array([0.1, 0.9, 0.4]), np.array([0, 1, 1])) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    maps = [rng.random((8, 8)) for _ in range(3)]
    masks = [np.zeros((8, 8), bool), rng.random((8, 8)) < 0.3, rng.random((8, 8)) < 0.3]
    out = metrics.all_metrics(maps, masks, np.array([m.max() for m in maps]), np.array([0, 1, 1]), 0.5)
    assert set(out) == {"pixel_auroc", "aupro_0.3", "image_auroc", "fpr_at_tpr_0.99", "fpr_at_tpr_0.995",
                        "best_f1", "best_f1_threshold", "iou", "threshold", "null_reasons"}
    assert out.pop("null_reasons") == {}
    assert all(v is None or 0 <= v <= 1 for v in out.values())


@pytest.mark.parametrize("masks,labels,pixel_reason,image_reason", [
    ([None, None, None], [0, 1, 1], "no test image has a ground-truth mask", None),
    ([np.zeros((8, 8), bool), np.zeros((8, 8), bool), None], [0, 0, 1],
     "the ground-truth masks mark no defect pixel", None),
    ([np.zeros((8, 8), bool)] * 3, [0, 0, 0], "the ground-truth masks mark no defect pixel",
     "the test set has no defective image"),
])
def test_metrics_the_data_cannot_define_are_null_with_the_reason(masks, labels, pixel_reason, image_reason):
    maps = [np.full((8, 8), 0.9)] * 3  # every pixel predicted defective: an IoU of 0.0 would be a made-up number
    out = metrics.all_metrics(maps, masks, np.array([0.9, 0.9, 0.9]), np.array(labels), 0.5)
    for name in ("pixel_auroc", "aupro_0.3", "fpr_at_tpr_0.99", "best_f1", "iou"):
        assert out[name] is None and pixel_reason in out["null_reasons"][name]
    if image_reason:
        assert out["image_auroc"] is None and out["null_reasons"]["image_auroc"] == image_reason
    else:
        assert out["image_auroc"] is not None and "image_auroc" not in out["null_reasons"]


def test_auroc_intervals_hold_the_estimate_and_shrink_with_more_images():
    from eproj.train.metrics import auroc_difference_interval, image_auroc, image_auroc_interval

    rng = np.random.default_rng(3)

    def draw(n_normal, n_defect):  # defect scores shifted by one sd: AUROC about 0.76
        labels = np.r_[np.zeros(n_normal), np.ones(n_defect)]
        return rng.normal(size=len(labels)) + labels, labels

    scores, labels = draw(11, 37)  # the size of a texture's test split
    lo, hi = image_auroc_interval(scores, labels)
    auc = image_auroc(scores, labels)
    assert lo < auc < hi
    # Hanley & McNeil's standard error for these counts, as an independent check of the width
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + 36 * (q1 - auc ** 2) + 10 * (q2 - auc ** 2)) / (37 * 11))
    assert 0.6 < (hi - lo) / (2 * 1.96 * se) < 1.5
    big, big_labels = draw(1100, 3700)
    big_lo, big_hi = image_auroc_interval(big, big_labels, resamples=200)
    assert big_hi - big_lo < (hi - lo) / 4
    assert image_auroc_interval(scores, labels) == (lo, hi)  # seeded
    assert image_auroc_interval(labels, labels) == (1.0, 1.0)  # separated on every draw
    assert image_auroc_interval(scores, np.ones(48)) is None
    # paired: a score against itself never differs; a perfect score beats a weak one
    assert auroc_difference_interval(scores, scores, labels) == (0.0, 0.0)
    d_lo, d_hi = auroc_difference_interval(labels + 0.0, scores, labels)
    assert 0 < d_lo <= d_hi <= 1 - lo + 1e-12 and d_lo <= 1 - auc <= d_hi


@pytest.mark.parametrize("scores, labels, confidence, message", [
    (np.zeros(4), np.array([0, 1, 0]), 0.95, "one value per image"),
    (np.array([0.1, np.nan, 0.3]), np.array([0, 1, 0]), 0.95, "finite"),
    (np.zeros(3), np.array([0, 1, 0]), 1.0, "confidence"),
])
def test_auroc_interval_refuses_bad_input(scores, labels, confidence, message):
    from eproj.train.metrics import image_auroc_interval

    with pytest.raises(ValueError, match=message):
        image_auroc_interval(scores, labels, confidence=confidence)
