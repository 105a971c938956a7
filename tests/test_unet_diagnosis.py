"""reports/unet/diagnose.py: capacity, copying, separability and training length on validation data."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "reports" / "unet" / "diagnose.py"


def _script():
    spec = importlib.util.spec_from_file_location("unet_diagnosis", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grass_pairs():
    from eproj.train.data import load_source

    return _script().validation_pairs(load_source("textures:grass", size=32))


def test_unexplained_variance_is_zero_for_a_copy_and_one_for_the_crop_mean():
    diagnose = _script()
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    assert diagnose.unexplained_variance(x, x)["pooled"] == 0.0
    means = np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape)
    got = diagnose.unexplained_variance(x, means)
    assert got["pooled"] == pytest.approx(1.0) and got["median"] == pytest.approx(1.0) and got["crops"] == 5


def test_validation_pairs_rebuild_the_clean_crop_of_each_calibration_defect(grass_pairs):
    from eproj.train.calibrate import validation_sets
    from eproj.train.data import load_source

    normal, defective, masks = validation_sets(load_source("textures:grass", size=32))
    assert np.array_equal(grass_pairs["defective"], defective) and np.array_equal(grass_pairs["normal"], normal)
    clean = grass_pairs["clean"]
    assert clean.shape == defective.shape and masks.any(axis=(1, 2)).all()
    inside = np.broadcast_to(masks[:, None], clean.shape)
    assert np.array_equal(clean[~inside], defective[~inside]) and not np.array_equal(clean[inside], defective[inside])


def test_separability_of_a_copy_is_chance_and_its_no_copying_counterfactual_is_near_perfect(grass_pairs):
    diagnose = _script()
    p = grass_pairs
    got = diagnose.separability(p, p["normal"], p["defective"], p["clean"])  # f = identity
    assert set(got) == set(diagnose.MAPS) | {"defect_contrast", "fill_variance"}
    assert got["residual"]["pixel_auroc"] == 0.5 and got["residual"]["defect_share_above_normal_p99"] == 0.0
    for name in ("residual_no_copying", "dssim_no_copying", "residual_unrelated_fill"):
        assert got[name]["pixel_auroc"] > 0.9, name
    assert got["residual_unrelated_fill"]["aupro"] > 0.5


def test_fill_variance_is_one_for_the_clean_texture_and_zero_for_a_flat_fill(grass_pairs):
    diagnose = _script()
    clean, masks = grass_pairs["clean"], grass_pairs["masks"]
    assert diagnose.fill_variance(clean, clean, masks) == {"pooled": 1.0, "median": 1.0}
    flat = np.where(masks[:, None], np.float32(0.3), clean)
    assert diagnose.fill_variance(flat, clean, masks)["pooled"] == pytest.approx(0.0, abs=1e-9)


def test_training_trend_reads_tqdm_rec_values_once_per_step(tmp_path):
    diagnose = _script()
    bar = "train unet:  {p}%|#| {s}/10 [00:0{s}<00:01, 1.0step/s, rec={r}]\r"
    text = "".join(bar.format(p=s * 10, s=s, r=100 - s) for s in range(1, 9))
    text += "Traceback ...\nresumed\n" + "".join(bar.format(p=s * 10, s=s, r=50 - s) for s in range(7, 11))
    (tmp_path / "run.log").write_text(text)
    got = diagnose.training_trend(tmp_path / "run.log", 10, window=3)
    assert got["first_mean"] == pytest.approx(98.0) and got["last_mean"] == pytest.approx(41.0)
    assert diagnose.training_trend(tmp_path / "run.log", 5, window=2)["last_mean"] == pytest.approx(95.5)
    assert diagnose.training_trend(tmp_path / "missing.log", 10) is None
    assert diagnose.log_for(Path("runs/interim/grass-unet-puzzle-partial/model.pt")) == Path("runs/grass-unet-puzzle.log")


def test_calibration_figures_find_the_chosen_rule_in_old_and_new_tables():
    diagnose = _script()
    rule = {"stop_threshold": 2.0, "max_iters": 10, "gate_lr": 3.0, "k": 1}
    table = [{"rule": "training-min", "stop_threshold": 1.0, "max_iters": 100, "gate_lr": None, "k": None,
              "pixel_auroc": 0.7, "aupro": 0.6, "mean_iterations": 20.0},
             {"rule": "k=1 cap=10", **rule, "pixel_auroc": 0.8, "aupro": 0.5, "mean_iterations": 2.0},
             {"rule": "k=1 cap=20", **rule, "max_iters": 20, "pixel_auroc": 0.75, "aupro": 0.5, "mean_iterations": 3.0}]
    old = diagnose.calibration_figures({"stop_rule": "validation", "stop_rules": {"validation": rule},
                                        "stop_rule_selection": table})
    assert old["chosen"]["rule"] == "k=1 cap=10" and old["100 iterations"] is None
    assert old["training-min"]["pixel_auroc"] == 0.7 and old["best"]["rule"] == "k=1 cap=10"
    new_rule = {**rule, "max_iters": 20, "gate_rec_error": None, "gate_first_update": True}
    reference = {"rule": "100 iterations", "stop_threshold": None, "max_iters": 100, "gate_lr": None, "k": None,
                 "pixel_auroc": 0.9, "aupro": 0.8, "mean_iterations": 100.0}
    new = diagnose.calibration_figures({"stop_rule": "validation", "stop_rules": {"validation": new_rule},
                                        "stop_rule_selection": [reference] + table})
    assert new["chosen"]["rule"] == "k=1 cap=20" and new["100 iterations"]["aupro"] == 0.8
    assert new["best"]["rule"] == "100 iterations"


def test_the_diagnosis_of_a_tiny_unet_writes_every_measure_and_its_command(tmp_path):
    from eproj.train.checkpoint import TrainedModel, save_model
    from eproj.train.models import ModelConfig, build_model

    rule = {"stop_threshold": 2.0, "max_iters": 10, "gate_lr": 3.0, "k": 1}
    calibration = {"stop_threshold": 2.0, "stop_rule": "validation", "stop_rules": {"validation": rule},
                   "stop_rule_selection": [{"rule": "k=1 cap=10", **rule, "pixel_auroc": 0.6, "aupro": 0.4,
                                            "mean_iterations": 2.0}], "segmentation": {}, "lr_stats": {}}
    model = build_model(ModelConfig(family="unet", size=32, width=4)).eval()
    path = save_model(TrainedModel(model, calibration, {"data": "textures:grass", "steps": 2, "regime": "puzzle"},
                                   tmp_path), tmp_path / "grass-unet-puzzle" / "model.pt")
    diagnose = _script()
    assert diagnose.main([str(path), "--out", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert payload["command"] == f".venv/bin/python reports/unet/diagnose.py {path} --out {tmp_path / 'out'}"
    result, = payload["results"]
    assert result["step"] == 2 and result["regime"] == "puzzle" and result["validation"]["defect_images"] > 0
    assert 0 < result["capacity"]["validation"]["pooled"] and result["copying"]["crops"] > 0
    for name in diagnose.MAPS:
        assert 0 <= result["separability"][name]["pixel_auroc"] <= 1, name
    assert result["projection_validation"]["chosen"]["pixel_auroc"] == 0.6
    text = (tmp_path / "out" / "diagnosis.md").read_text()
    assert payload["command"] in text and "## textures:grass" in text and "## Findings" in text
    assert "grass-unet-puzzle (2 steps)" in text and "were not varied" in text and "| 0.600 / 0.400 |" in text


def _row(model, settings, chosen, kept, regime="puzzle"):
    cell = {"pixel_auroc": chosen, "aupro": chosen - 0.1, "rule": "r", "mean_iterations": 1.0}
    separability = {"residual": {"pixel_auroc": chosen - 0.05}, "dssim_reconstruction": {"pixel_auroc": chosen - 0.02}}
    return {"model": model, "data": "textures:grass", "family": "unet", "regime": regime, "step": 3600,
            "settings": settings, "projection_validation": {"chosen": cell, "100 iterations": cell},
            "separability": separability, "copying": {"pooled": kept}, "capacity": {"validation": {"pooled": 0.3}}}


def test_variant_findings_name_the_changed_setting_against_the_base_run():
    diagnose = _script()
    base_settings = {"width": 16, "fgsm_eps": 0.01, "adv_weight": 0.0, "weight_decay": None, "batch": 8, "lr": 1e-3}
    base = _row("runs/grass-unet-puzzle/model.pt", base_settings, 0.74, 0.15)
    other = _row("runs/grass-unet-corrupt/model.pt", base_settings, 0.70, 0.80, regime="corrupt")
    w8 = _row("runs/grass-unet-puzzle-w8/model.pt", {**base_settings, "width": 8, "weight_decay": 0.0}, 0.71, 0.12)
    eps0 = _row("runs/grass-unet-puzzle-eps0/model.pt", {**base_settings, "fgsm_eps": 0.0}, 0.76, 0.20)
    got = diagnose.variant_findings([other, eps0, base, w8])
    assert len(got) == 2
    assert got[0].startswith("grass-unet-puzzle-eps0 (3600 steps) against grass-unet-puzzle (3600 steps) "
                             "(fgsm_eps 0.01 → 0; not recorded by both: weight_decay)")
    assert "chosen rule 0.740 / 0.640 → 0.760 / 0.660" in got[0] and "defect kept 0.150 → 0.200" in got[0]
    assert "(width 16 → 8; not recorded by both: weight_decay)" in got[1] and "0.710 / 0.610" in got[1]
    assert diagnose.variant_findings([base, other])[0].startswith("Width, ε (the FGSM step) and the adversarial term "
                                                                  "were not varied")
    alone = diagnose.variant_findings([w8])
    assert alone == ["grass-unet-puzzle-w8 (3600 steps): no base run of the same data and regime was measured beside it."]
