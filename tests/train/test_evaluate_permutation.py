"""Puzzle-AE's permutation scores in the evaluation of unet models (eproj.train.evaluate)."""

import numpy as np
import pytest
import torch

from eproj.errors import ConfigError
from eproj.train.checkpoint import TrainedModel
from eproj.train.data import TestSample
from eproj.train.evaluate import fpr_at_image_tpr, run_on_samples, summarise
from eproj.train.models import ModelConfig, build_model
from eproj.train.projection import ProjectionConfig
from eproj.train.puzzle import permutation_calibration, permutation_maps


def _unet(with_permutation=True):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="unet", size=32, width=4)).eval()
    calibration = {"stop_threshold": 1.0, "projection": ProjectionConfig(max_iters=3).to_dict(),
                   "segmentation": {m: {"dssim": 0.1, "l2": 0.01, "score": 0.2}
                                    for m in ("reconstruction", "projection")}}
    if with_permutation:
        normal = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
        calibration["permutation"] = permutation_calibration(model, normal, "tile", 0.99)
    return TrainedModel(model, calibration, {}, "memory")


def test_fpr_at_image_tpr_by_hand():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.35])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    assert fpr_at_image_tpr(scores, labels, 0.99) == 0.0  # threshold 0.4 flags every defect, no normal
    assert fpr_at_image_tpr(np.array([0.1, 0.5, 0.3, 0.2]), np.array([0, 0, 1, 1]), 0.99) == 0.5
    assert fpr_at_image_tpr(np.array([0.1, 0.5, 0.3, 0.2]), np.array([0, 0, 1, 1]), 0.5) == 0.5
    assert fpr_at_image_tpr(scores, np.zeros(7), 0.99) is None


def test_unet_results_carry_the_permutation_map_and_puzzle_score_of_their_tiles():
    trained = _unet()
    rng = np.random.default_rng(1)
    images = [rng.random((64, 32, 1)).astype(np.float32) for _ in range(3)]
    masks = [np.zeros((64, 32), bool) for _ in range(3)]
    masks[2][5:9, 5:9] = True
    labels = [0, 0, 1]
    samples = [TestSample(f"s{i}", im, m, lab, "good" if lab == 0 else "cut")
               for i, (im, m, lab) in enumerate(zip(images, masks, labels))]
    results = run_on_samples(trained, samples, "reconstruction", None, progress=False)
    entry = trained.calibration["permutation"]
    normaliser = torch.tensor(entry["normaliser"], dtype=torch.float64)
    lower = torch.from_numpy(images[1][32:].transpose(2, 0, 1)[None].copy())
    score, alone = permutation_maps(trained.model, lower, "swaps", normaliser)
    np.testing.assert_allclose(results[1].maps["permutation"][32:], alone[0].numpy(), rtol=1e-5, atol=1e-8)
    upper = torch.from_numpy(images[1][:32].transpose(2, 0, 1)[None].copy())
    assert results[1].scores["puzzle"] == pytest.approx(
        max(float(score[0]), float(permutation_maps(trained.model, upper, "swaps", normaliser)[0][0])), rel=1e-5)
    with torch.no_grad():
        residual = float(((trained.model(lower) - lower) ** 2).sum())
        residual = max(residual, float(((trained.model(upper) - upper) ** 2).sum()))
    assert results[1].scores["plain"] == pytest.approx(residual, rel=1e-4)
    report = summarise(trained, results, "reconstruction")
    metrics = report["metrics"]
    assert metrics["permutation"]["threshold"] == entry["map_threshold"]
    assert metrics["permutation"]["pixel_auroc"] is not None
    puzzle = np.array([r.scores["puzzle"] for r in results])
    protocol = metrics["puzzle_protocol"]
    want_auroc = float(np.mean([puzzle[2] > puzzle[0], puzzle[2] > puzzle[1]]))
    assert protocol["puzzle"]["image_auroc"] == pytest.approx(want_auroc)
    assert protocol["puzzle"]["fpr_at_tpr_0.99"] == fpr_at_image_tpr(puzzle, np.array(labels), 0.99)
    assert set(protocol["plain"]) == {"image_auroc", "fpr_at_tpr_0.99", "fpr_at_tpr_0.995"}


def test_a_unet_model_without_permutation_normalisers_is_refused():
    trained = _unet(with_permutation=False)
    sample = TestSample("s", np.zeros((32, 32, 1), np.float32), None, 0, "good")
    with pytest.raises(ConfigError, match="no permutation normalisers.*recalibrate"):
        run_on_samples(trained, [sample], "reconstruction", None, progress=False)


def test_eproj_eval_of_a_unet_run_reports_the_permutation_map_and_puzzle_protocol(tmp_path, capsys):
    import json

    from conftest import make_mvtec
    from eproj.cli import main

    folder = make_mvtec(tmp_path / "mvtec" / "nut", size=32, n_train=4)
    run = tmp_path / "run"
    assert main(["--threads", "1", "train", "--data", f"mvtec:{folder}", "--model", "unet", "--size", "32",
                 "--width", "4", "--steps", "2", "--batch", "2", "--lr", "1e-3", "--regime", "puzzle",
                 "--adv-weight", "0.02", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["--threads", "1", "eval", str(run), "--method", "reconstruction",
                 "--json", str(tmp_path / "eval.json")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert set(shown) == {"dssim", "permutation", "puzzle_protocol"}
    written = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert written["puzzle_protocol"]["puzzle"] == shown["puzzle_protocol"]["puzzle"]
    assert "23 permutations" not in written["puzzle_protocol"]["note"] and "K = 23" in written["puzzle_protocol"]["note"]
