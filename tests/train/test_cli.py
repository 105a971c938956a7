"""End to end through the CLI on a tiny model: train, resume, calibrate, eval, errors."""

import json

import numpy as np
import pytest

from eproj.cli import main
from eproj.train.checkpoint import load_model, load_payload


def _train(folder, out, steps, *extra):
    return main(["--threads", "1", "train", "--data", f"mvtec:{folder}", "--model", "l2ae", "--size", "32",
                 "--latent", "8", "--steps", str(steps), "--batch", "4", "--lr", "1e-3",
                 "--checkpoint-every", "2", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import make_mvtec

    root = tmp_path_factory.mktemp("cli")
    folder = make_mvtec(root / "mvtec" / "pill", n_train=6)
    run = root / "run"
    assert _train(folder, run, 3, "--no-calibrate") == 0
    assert load_payload(run / "checkpoint.pt", "eproj-checkpoint")["step"] == 3
    assert not (run / "model.pt").exists()
    assert _train(folder, run, 6) == 0  # resumes from step 3, then calibrates
    return folder, run


def test_train_resumes_and_calibrates(trained_run):
    _, run = trained_run
    assert load_payload(run / "checkpoint.pt", "eproj-checkpoint")["step"] == 6
    trained = load_model(run)
    cal = trained.calibration
    assert cal["stop_rules"]["training-min"]["stop_threshold"] == cal["lr_stats"]["min"] > 0
    assert cal["stop_threshold"] == cal["stop_rules"][cal["stop_rule"]]["stop_threshold"]
    assert cal["lr_stats"]["q0.5"] >= cal["lr_stats"]["min"]
    for method in ("reconstruction", "projection"):
        assert set(cal["segmentation"][method]) == {"dssim", "l2", "score"}
    assert trained.train["data"].startswith("mvtec:")
    # the frame range spans the training inputs too: Lr(x0) and the pixels' spread, no map-mean bound
    frame_range = cal["decision"]["frame_range"]
    assert set(frame_range) == {"lr0", "x0_std"}
    assert frame_range["lr0"][0] <= cal["lr_stats"]["min"] / cal["decision"]["range_margin"] + 1e-9
    assert frame_range["lr0"][1] >= cal["lr_stats"]["max"] * cal["decision"]["range_margin"] - 1e-6


def test_resume_is_identical_to_an_uninterrupted_run(trained_run, tmp_path):
    folder, run = trained_run
    assert _train(folder, tmp_path / "straight", 6, "--no-calibrate") == 0
    a = load_payload(run / "checkpoint.pt", "eproj-checkpoint")["model"]
    b = load_payload(tmp_path / "straight" / "checkpoint.pt", "eproj-checkpoint")["model"]
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["reconstruction", "projection"])
def test_eval_writes_metrics_and_maps(trained_run, tmp_path, method):
    _, run = trained_run
    out = tmp_path / "r.json"
    maps = tmp_path / "maps"
    assert main(["eval", str(run), "--method", method, "--json", str(out), "--save-maps", str(maps),
                 "--max-iters", "5"]) == 0
    report = json.loads(out.read_text())
    assert report["method"] == method
    m = report["metrics"]["dssim"]
    assert 0 <= m["pixel_auroc"] <= 1 and 0 <= m["aupro_0.3"] <= 1 and m["image_auroc"] is not None
    assert set(report["metrics"]) == {"dssim", "l2", "image_scores"}
    assert report["iterations"]["max"] <= 5
    if method == "reconstruction":
        assert report["iterations"]["max"] == 0
    names = sorted(i["name"] for i in report["images"])
    assert names == ["crack_000", "crack_001", "good_000", "good_001"]
    for name in names:
        amap = np.load(maps / f"{name}.npy")
        assert amap.shape == (32, 32) and amap.dtype == np.float32
        assert (maps / f"{name}_mask.png").is_file()


def test_cli_errors_are_clear(trained_run, tmp_path, capsys):
    folder, run = trained_run
    assert main(["eval", str(run), "--data", f"mvtec:{tmp_path / 'missing'}", "--json",
                 str(tmp_path / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _train(folder, run, 6, "--latent", "9") == 2  # a run started with other options
    assert "Use the same options to resume" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"garbage")
    assert main(["eval", str(tmp_path / "bad"), "--data", f"mvtec:{folder}", "--json", str(tmp_path / "y.json")]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert main(["train", "--data", "textures:brick", "--model", "l2ae", "--size", "100", "--out",
                 str(tmp_path / "z")]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_wrong_channels_between_model_and_data(trained_run, tmp_path, capsys):
    from conftest import make_mvtec

    _, run = trained_run
    rgb = make_mvtec(tmp_path / "rgb" / "pill", channels=3)
    assert main(["eval", str(run), "--data", f"mvtec:{rgb}", "--json", str(tmp_path / "o.json")]) == 2
    assert "3-channel images; the model expects 1" in capsys.readouterr().err


def test_eval_projection_parameters_override_the_stored_ones(trained_run, tmp_path):
    _, run = trained_run
    out = tmp_path / "p.json"
    assert main(["eval", str(run), "--json", str(out), "--max-iters", "3", "--alpha", "0.01", "--step", "adam",
                 "--lam", "0.1", "--stop-threshold", "0", "--stop-rule", "training-min"]) == 0  # no gate
    report = json.loads(out.read_text())
    p = report["projection"]
    assert (p["alpha"], p["step"], p["lam"], p["max_iters"], p["stop_threshold"]) == (0.01, "adam", 0.1, 3, 0.0)
    assert report["iterations"]["stop_reasons"] == {"max_iters": 4}
    assert sum(report["iterations"]["histogram"]["counts"]) == 4


@pytest.mark.parametrize("options,expected", [
    (["--model", "vae", "--beta", "2", "--size", "64"], {"family": "vae", "beta": 2.0, "architecture": "zimmerer"}),
    (["--model", "gvae", "--size", "32"], {"family": "gvae", "architecture": "bergmann"}),
    (["--model", "dsae", "--size", "32", "--latent", "4"], {"family": "dsae", "latent": 4}),
])
def test_every_family_trains_through_the_cli(trained_run, tmp_path, options, expected):
    folder, _ = trained_run
    out = tmp_path / "run"
    assert main(["--threads", "1", "train", "--data", f"mvtec:{folder}", *options, "--steps", "2", "--batch", "2",
                 "--out", str(out)]) == 0
    config = load_model(out).config.to_dict()
    assert {k: config[k] for k in expected} == expected


@pytest.mark.parametrize("option,value,stored", [("--lr", "2e-3", "1e-3"), ("--batch", "2", "4"),
                                                 ("--seed", "5", "0"), ("--kl-warmup", "10", "2000"),
                                                 ("--fit", "tile", "default")])
def test_resuming_with_other_training_options_is_refused(trained_run, capsys, option, value, stored):
    folder, run = trained_run
    before = (run / "checkpoint.pt").read_bytes()
    assert _train(folder, run, 8, option, value) == 2
    err = capsys.readouterr().err
    assert f"was trained with {option} " in err and f"(now {value.replace('2e-3', '0.002')})" in err
    assert "only --steps, --checkpoint-every and --weights may change" in err
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing trained, nothing written


def test_resuming_may_change_the_checkpoint_interval(trained_run):
    folder, run = trained_run
    assert _train(folder, run, 6, "--no-calibrate", "--checkpoint-every", "5") == 0
    assert load_payload(run / "checkpoint.pt", "eproj-checkpoint")["train"]["checkpoint_every"] == 5


def test_eval_without_masks_reports_null_pixel_metrics_with_the_reason(trained_run, tmp_path):
    import shutil

    from conftest import make_mvtec

    folder = make_mvtec(tmp_path / "own", size=32)
    shutil.rmtree(folder / "ground_truth")  # folder: data may come without masks
    _, run = trained_run
    out = tmp_path / "r.json"
    assert main(["eval", str(run), "--data", f"folder:{folder}", "--method", "reconstruction",
                 "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]["dssim"]
    assert metrics["iou"] is None and metrics["pixel_auroc"] is None and metrics["image_auroc"] is not None
    assert "no defect pixel" in metrics["null_reasons"]["iou"]


def test_eval_takes_the_stop_rule(trained_run, tmp_path):
    """--stop-rule picks one of the model's calibrated rules; the report says which ran."""
    _, run = trained_run
    reports = {}
    for rule in ("training-min", "validation"):
        out = tmp_path / f"{rule}.json"
        assert main(["--threads", "1", "eval", str(run), "--method", "projection", "--json", str(out),
                     "--stop-rule", rule, "--max-iters", "3"]) == 0
        reports[rule] = json.loads(out.read_text())
    assert reports["training-min"]["stop_rule"] == "training-min" and reports["training-min"]["gate_lr"] is None
    assert reports["validation"]["stop_rule"] == "validation"
