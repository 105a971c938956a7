"""The calibrated verdict (eproj.decision): scores, regions, the frame range, and the rule
that a mask with a large region is never "no defect"."""

import numpy as np
import pytest

from eproj.decision import (IMAGE_SCORES, UNLIKE_NORMAL, Decision, frame_range, largest_region, rec_error_map,
                            tile_scores)


def _decision(**changes):
    values = {"image_score": "rec_error_max", "score_threshold": 0.5, "min_region_area": 20,
              "frame_range": {"lr0": [1.0, 10.0], "map_mean": [0.01, 0.2]},
              "zero_iteration_map_scale": 0.5, "gate_lr": 3.0}
    values.update(changes)
    return Decision.from_dict(values, score_threshold=99.0)


def test_tile_scores():
    dssim = np.zeros((2, 8, 8), np.float32)
    dssim[1, :2, :4] = 0.8
    rec = np.zeros((2, 8, 8), np.float32)
    rec[0, 3, 3] = 0.25
    scores = tile_scores(dssim, rec, np.array([1.0, 2.0]), pixel_threshold=0.5)
    assert set(scores) == set(IMAGE_SCORES)
    np.testing.assert_allclose(scores["dssim_max"], [0, 0.8], rtol=1e-6)
    np.testing.assert_allclose(scores["dssim_area"], [0, 8 / 64])
    np.testing.assert_allclose(scores["rec_error_max"], [0.25, 0])
    np.testing.assert_allclose(scores["lr0"], [1, 2])
    x0, f = np.ones((1, 3, 2, 2), np.float32), np.zeros((1, 3, 2, 2), np.float32)
    f[0, 0] = 1
    np.testing.assert_allclose(rec_error_map(x0, f), np.full((1, 2, 2), 2 / 3), rtol=1e-6)


def test_largest_region_is_eight_connected():
    mask = np.zeros((10, 10), bool)
    assert largest_region(mask) == 0
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal line: one region
    mask[6:9, 6:9] = True
    assert largest_region(mask) == 9


def test_a_large_mask_region_is_never_no_defect():
    """Whatever the score, a mask with a region of the calibrated area is a defect."""
    decision = _decision()
    mask = np.zeros((32, 32), bool)
    mask[4:9, 4:8] = True  # 20 pixels
    inside = {"lr0": 5.0, "map_mean": 0.05}
    assert decision.verdict(0.0, mask, inside) == (True, "")
    mask[4, 4] = False  # 19 pixels: the score decides
    assert decision.verdict(0.0, mask, inside) == (False, "")
    assert decision.verdict(0.6, mask, inside) == (True, "")


@pytest.mark.parametrize("statistics", [{"lr0": 0.5, "map_mean": 0.05}, {"lr0": 11.0, "map_mean": 0.05},
                                        {"lr0": 5.0, "map_mean": 0.3}, {"lr0": 5.0, "map_mean": 0.001},
                                        {"lr0": float("nan"), "map_mean": 0.05}])
def test_a_frame_outside_the_normal_range_is_a_defect(statistics):
    defect, reason = _decision().verdict(0.0, np.zeros((8, 8), bool), statistics)
    assert defect and reason == UNLIKE_NORMAL


def test_a_non_finite_score_is_a_defect():
    assert _decision().verdict(float("nan"), np.zeros((8, 8), bool), {"lr0": 5.0, "map_mean": 0.05})[0]


def test_frame_statistics_take_the_extreme_tile():
    decision = _decision()
    dssim = np.full((3, 4, 4), 0.05, np.float32)
    std = np.full(3, 0.1)
    assert decision.frame_statistics(np.array([5.0, 0.5, 6.0]), dssim, std)["lr0"] == 0.5  # under the range
    assert decision.frame_statistics(np.array([5.0, 7.0, 6.0]), dssim, std)["lr0"] == 7.0


def test_an_uncalibrated_decision_is_the_plain_rule():
    plain = Decision.from_dict(None, score_threshold=0.4)
    assert plain.image_score == "dssim_max" and plain.gate_lr is None and plain.zero_iteration_map_scale == 1
    assert plain.verdict(0.5, np.ones((8, 8), bool), {}) == (True, "")
    assert plain.verdict(0.3, np.ones((8, 8), bool), {}) == (False, "")
    with pytest.raises(ValueError):
        Decision.from_dict({"image_score": "mean", "score_threshold": 1.0}, 1.0)


def test_frame_range_widens_by_the_margin():
    assert frame_range({"lr0": np.array([2.0, 4.0, 8.0])}, 2.0) == {"lr0": [1.0, 16.0]}
    assert frame_range({"m": np.array([2.0, 8.0])}, 2.0, low_only=("m",)) == {"m": [1.0, None]}
    decision = _decision(frame_range={"lr0": [1.0, 10.0], "map_mean": [0.01, None]})
    assert decision.verdict(0.0, np.zeros((8, 8), bool), {"lr0": 5.0, "map_mean": 5.0}) == (False, "")
    assert decision.verdict(0.0, np.zeros((8, 8), bool), {"lr0": 5.0, "map_mean": 0.0})[1] == UNLIKE_NORMAL


def test_map_factors():
    from eproj.decision import map_factors

    np.testing.assert_allclose(map_factors(np.array([0, 1, 5]), None, 0.25), [0.25, 1, 1])
    np.testing.assert_allclose(map_factors(np.array([0, 1, 5]), (0.5, 4.0, 2.0), 0.25), [0.5, 4.0, 2.0])
