"""eproj train / calibrate / eval with --model piad: a tiny run end to end, resuming, refusals,
the scores and maps against their formulas, the calibration against its quantiles."""

import json

import numpy as np
import pytest
import torch

from eproj.cli import main
from eproj.errors import CheckpointError, ConfigError
from eproj.decision import UNLIKE_NORMAL
from eproj.piad_decision import PIADDecision
from eproj.train.calibrate import validation_sets
from eproj.train.data import load_source
from eproj.train.perceptual import FeatureStats, build_feature_network, feature_distance_map, relative_perceptual_l1
from eproj.train.piad_calibrate import (PIAD_MODEL_FORMAT, PIAD_SCORES, evaluate_piad, is_piad_file, load_piad_model,
                                        piad_outputs)
from eproj.train.piad_networks import PIAD, PIADConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--data", "textures:grass", "--model", "piad", "--size", "16", "--width", "4", "--latent", "4",
        "--batch", "4", "--n-dis", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A PIAD run of 2 steps on grass at 16 x 16, calibrated."""
    out = tmp_path_factory.mktemp("piad") / "run"
    assert main(["--threads", "1", "train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


def test_train_writes_a_calibrated_piad_model_and_resumes(run, capsys):
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["format"] == PIAD_MODEL_FORMAT and payload["step"] == 2
    assert payload["train"]["data"] == "textures:grass" and payload["train"]["input"]["fit"] == "tile"
    assert payload["features"]["network"] == "efficientnet-lite0" and payload["features"]["tap"] == "stage3"
    assert is_piad_file(run) and is_piad_file(run / "checkpoint.pt")
    # a rerun with more steps resumes from step 2
    assert main(["--threads", "1", "train", *TINY, "--steps", "3", "--no-calibrate", "--out", str(run)]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    # mismatched options are refused, naming them
    assert main(["train", *TINY[:-1], "2", "--steps", "4", "--out", str(run)]) == 2
    assert "n_dis 1 (now 2)" in capsys.readouterr().err
    other = [*TINY[:1], "textures:brick", *TINY[2:]]
    assert main(["train", *other, "--steps", "4", "--out", str(run)]) == 2
    assert "data 'textures:grass' (now 'textures:brick')" in capsys.readouterr().err
    assert main(["train", *TINY, "--perceptual-tap", "stage4", "--steps", "4", "--out", str(run)]) == 2
    assert "feature network" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--regime", "puzzle"], "--regime do not apply to --model piad"),
    (["--lr", "0.001", "--arch", "bergmann"], "--arch, --lr do not apply to --model piad"),
    (["--perceptual", "vgg19"], "VGG-19 needs --perceptual-weights"),
    (["--perceptual", "vgg19", "--perceptual-weights", "w.pth", "--perceptual-tap", "stage3"],
     "vgg19 is tapped at relu4_2"),
    (["--size", "48"], "power of 2 >= 8, got 48"),
])
def test_bad_combinations_are_refused_with_their_names(tmp_path, capsys, extra, message):
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "r"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_piad_options_are_refused_for_other_families(tmp_path, capsys):
    assert main(["train", "--data", "textures:grass", "--model", "l2ae", "--n-dis", "1", "--out",
                 str(tmp_path)]) == 2
    assert "--n-dis set PIAD's training (--model piad); --model l2ae has none" in capsys.readouterr().err


def test_scores_and_maps_follow_their_formulas():
    torch.manual_seed(0)
    model = PIAD(PIADConfig(size=16, width=4, latent=4)).eval()
    net = build_feature_network(allow_random=True)
    stats = FeatureStats(torch.rand(40) * 0.1, torch.rand(40) + 0.5, "identity")
    x = torch.rand(3, 3, 16, 16)
    out = piad_outputs(model, net, stats, x.numpy(), batch=2)
    with torch.no_grad():
        y = model.reconstruct(x)
        fx, fy = net(x), net(y)
        nx, ny = (fx - stats.mean.view(1, -1, 1, 1)) / stats.std.view(1, -1, 1, 1), \
            (fy - stats.mean.view(1, -1, 1, 1)) / stats.std.view(1, -1, 1, 1)
        expect = {"rel_perc_l1": relative_perceptual_l1(net, stats, x, y),
                  "perc_l1": (nx - ny).abs().mean(dim=(1, 2, 3)),
                  "perc": ((fx - fy) ** 2).mean(dim=(1, 2, 3)),
                  "l2": ((x - y) ** 2).mean(dim=(1, 2, 3))}
        for name in PIAD_SCORES:
            np.testing.assert_allclose(out[name], expect[name].numpy(), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(out["feature"], feature_distance_map(net, stats, x, y).numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(out["reconstruction"], y.numpy(), rtol=1e-6)
    assert out["dssim"].shape == (3, 16, 16) and out["dssim"].min() >= 0


def test_calibration_thresholds_are_the_normal_validation_quantiles(run):
    trained = load_piad_model(run)
    source = load_source("textures:grass", size=16, seed=0, fit="tile")
    normal, defects, _ = validation_sets(source)
    out = trained.outputs(normal)
    cal = trained.calibration
    assert cal["score_threshold"] == pytest.approx(np.quantile(out["rel_perc_l1"], 0.99))
    for name in ("feature", "dssim"):
        assert cal["segmentation"][name] == pytest.approx(np.quantile(out[name], 0.99), rel=1e-6)
    assert cal["decision"]["pixel_threshold"] == cal["segmentation"]["feature"]
    assert cal["validation_images"] == len(normal) and cal["validation_defect_images"] == len(defects) > 0
    assert set(cal["validation"]["image_auroc"]) == set(PIAD_SCORES)


def test_calibrate_and_eval_commands_on_a_piad_run(run, tmp_path, capsys):
    assert main(["--threads", "1", "calibrate", str(run)]) == 0
    assert main(["--threads", "1", "eval", str(run), "--json", str(tmp_path / "e.json"), "--save-maps",
                 str(tmp_path / "maps")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["family"] == "piad" and report["image_score"] == "rel_perc_l1"
    assert set(report["metrics"]["image_scores"]) == set(PIAD_SCORES)
    assert report["metrics"]["feature"]["image_auroc"] == report["metrics"]["image_scores"]["rel_perc_l1"]
    for kind in ("feature", "dssim"):
        assert 0 <= report["metrics"][kind]["pixel_auroc"] <= 1 and report["metrics"][kind]["aupro_0.3"] is not None
    assert len(list((tmp_path / "maps").glob("*.npy"))) == len(report["images"])
    capsys.readouterr()
    assert main(["eval", str(run), "--method", "projection", "--json", str(tmp_path / "x.json")]) == 2
    assert "--method projection is not one of its methods" in capsys.readouterr().err
    assert main(["eval", str(run), "--max-iters", "5", "--json", str(tmp_path / "x.json")]) == 2
    assert "--max-iters set the projection" in capsys.readouterr().err
    assert main(["report", str(run / "model.pt"), "--out", str(tmp_path / "r")]) == 2
    assert "PIAD models have no projection or predictor maps" in capsys.readouterr().err


def test_a_model_whose_feature_weights_changed_is_refused(run, tmp_path):
    payload = torch.load(run / "model.pt", weights_only=True)
    payload["features"]["sha256"] = "0" * 64
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="weights efficientnet-lite0-.*SHA-256 000000000000"):
        load_piad_model(tmp_path / "model.pt")


def test_decision_verdict_order():
    d = PIADDecision(score_threshold=1.0, pixel_threshold=0.5, min_region_area=3,
                     frame_range={"x0_std": [0.01, 0.5]})
    quiet, blob = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    blob[:2, :2] = True
    assert d.verdict(0.5, quiet, np.array([0.1])) == (False, "")
    assert d.verdict(2.0, quiet, np.array([0.1])) == (True, "score")
    assert d.verdict(float("nan"), quiet, np.array([0.1])) == (True, "score")
    assert d.verdict(0.5, blob, np.array([0.1])) == (True, "region")
    assert d.verdict(0.5, quiet, np.array([0.1, 0.001])) == (True, UNLIKE_NORMAL)
    assert PIADDecision.from_dict(d.to_dict()) == d
    with pytest.raises(ConfigError, match="map must be one of"):
        PIADDecision.from_dict({**d.to_dict(), "map": "l2"})


def test_evaluate_piad_needs_data(run):
    trained = load_piad_model(run)
    trained.train = {}
    with pytest.raises(ConfigError, match="does not record its training data"):
        evaluate_piad(trained)


def test_float16_weights_are_calibrated_as_shipped(tmp_path):
    out = tmp_path / "half"
    assert main(["--threads", "1", "train", *TINY, "--steps", "1", "--weights", "float16", "--out", str(out)]) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in payload["encoder"].values())
    trained = load_piad_model(out)
    normal, _, _ = validation_sets(load_source("textures:grass", size=16, seed=0, fit="tile"))
    assert trained.calibration["score_threshold"] == pytest.approx(
        np.quantile(trained.outputs(normal)["rel_perc_l1"], 0.99), rel=1e-6)


def test_an_ablation_loss_trains_and_scores_the_model(tmp_path, capsys):
    out = tmp_path / "l2"
    assert main(["--threads", "1", "train", *TINY, "--steps", "1", "--reconstruction-loss", "l2",
                 "--out", str(out)]) == 0
    trained = load_piad_model(out)
    assert trained.train["reconstruction_loss"] == "l2" and trained.score == "l2"
    normal, _, _ = validation_sets(load_source("textures:grass", size=16, seed=0, fit="tile"))
    assert trained.calibration["score_threshold"] == pytest.approx(np.quantile(trained.outputs(normal)["l2"], 0.99))
    assert evaluate_piad(trained)["image_score"] == "l2"
    assert main(["export", str(out), "--out", str(tmp_path / "b")]) == 2
    assert "scored by l2 (an ablation model)" in capsys.readouterr().err


def test_reconstruction_distances_follow_their_formulas():
    from eproj.train.perceptual import reconstruction_distance

    torch.manual_seed(0)
    net = build_feature_network(allow_random=True)
    stats = FeatureStats(torch.rand(40) * 0.1, torch.rand(40) + 0.5, "identity")
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        fx, fy = net(x), net(y)
        nx, ny = [(f - stats.mean.view(1, -1, 1, 1)) / stats.std.view(1, -1, 1, 1) for f in (fx, fy)]
        expect = {"l2": ((x - y) ** 2).mean(dim=(1, 2, 3)), "perc": ((fx - fy) ** 2).mean(dim=(1, 2, 3)),
                  "perc_l1": (nx - ny).abs().mean(dim=(1, 2, 3)),
                  "rel_perc_l1": (nx - ny).abs().sum(dim=(1, 2, 3)) / nx.abs().sum(dim=(1, 2, 3))}
        for kind, value in expect.items():
            torch.testing.assert_close(reconstruction_distance(kind, net, stats, x, y), value, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="reconstruction loss must be one of"):
        reconstruction_distance("l1", net, stats, x, y)


def test_a_checkpoint_from_before_the_loss_option_resumes_with_the_default(tmp_path):
    out = tmp_path / "old"
    assert main(["--threads", "1", "train", *TINY, "--steps", "1", "--no-calibrate", "--out", str(out)]) == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    del payload["train"]["reconstruction_loss"]
    torch.save(payload, out / "checkpoint.pt")
    assert main(["--threads", "1", "train", *TINY, "--steps", "2", "--no-calibrate", "--out", str(out)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
