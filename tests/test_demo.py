import json
import shlex
from pathlib import Path

import cv2
import pytest

from eproj import demo
from eproj.train.checkpoint import MODEL_FORMAT, load_model, load_payload


@pytest.mark.parametrize("family", ["l2ae", "unet"])
def test_demo_report_and_panels_on_a_tiny_model(monkeypatch, tmp_path, family):
    from conftest import make_mvtec
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    folder = make_mvtec(tmp_path / "mvtec" / "screw", size=32)
    config = (ModelConfig(family="unet", architecture="unet", size=32, width=4) if family == "unet"
              else ModelConfig(family="l2ae", size=32, latent=8))
    path = train(tmp_path / "run", config, TrainConfig(data=f"mvtec:{folder}", steps=2, batch=4, weights="float16",
                                                       regime="puzzle" if family == "unet" else "plain"),
                 progress=False)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.pt").write_bytes(path.read_bytes())
    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(demo, "SHIPPED", {"tiny": demo.ShippedModel(f"mvtec:{folder}", family, 2, 1e-4)})
    report = demo.run_demo(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    entry = saved["models"]["tiny"]
    assert entry["family"] == family and (tmp_path / "out" / "bundles" / "tiny" / "manifest.json").is_file()
    assert set(entry["projection"]["metrics"]["dssim"]) >= {"pixel_auroc", "aupro_0.3", "image_auroc"}
    assert entry["reconstruction"]["iterations"]["mean"] == 0
    picture = cv2.imread(str(tmp_path / "out" / "tiny.png"))
    assert picture is not None and picture.shape[1] == demo.CELL * len(demo.COLUMNS) + demo.BAR


def _result(name: str, label: int, score: float, value: float) -> "SampleResult":
    import numpy as np

    from eproj.train.data import TestSample
    from eproj.train.evaluate import SampleResult

    image = np.full((32, 32, 1), 0.5, np.float32)
    mask = np.zeros((32, 32), bool)
    dssim = np.zeros((32, 32), np.float32)
    dssim[4:12, 4:12] = value
    return SampleResult(TestSample(name, image, mask, label, "crack" if label else "good"),
                        {"dssim": dssim, "l2": dssim}, image, 7.0, score, ["threshold"])


def test_panel_rows_carry_a_colour_bar_and_each_method_s_score_and_verdict():
    import numpy as np

    from eproj.train.checkpoint import TrainedModel

    trained = TrainedModel(None, {"segmentation": {
        "reconstruction": {"dssim": 0.1, "l2": 0.01, "score": 0.3},
        "projection": {"dssim": 0.1, "l2": 0.01, "score": 0.2}}}, {}, "memory")
    recon = [_result("crack_000", 1, 0.25, 0.8), _result("good_000", 0, 0.05, 0.05)]
    proj = [_result("crack_000", 1, 0.5, 0.8), _result("good_000", 0, 0.1, 0.05)]
    judged = _result("good_000", 0, 0.1, 0.05)
    judged.defect, judged.reason = True, "unlike any normal frame"  # the evaluation's verdict rules
    assert demo.verdict(judged, 0.2) == "DEFECT" and demo.verdict(proj[1], 0.2) == "ok"
    assert "DEFECT (unlike any normal frame)" in demo.row_caption(recon[1], judged, trained)
    assert demo.row_caption(recon[0], proj[0], trained) == (
        "crack_000 (defective)  |  recon. score 0.250 ok  |  proj. score 0.500 DEFECT  |  7 iterations")
    picture = demo.panel("tiny", trained, recon, proj)
    assert picture.shape[1] == demo.CELL * len(demo.COLUMNS) + demo.BAR
    bar = demo.colour_bar(0.8)
    top, bottom = bar[2, 10].astype(int), bar[-3, 10].astype(int)
    assert top.sum() > 400 and bottom.sum() < 60  # inferno: bright at vmax (top), black at 0 (bottom)
    start = 36 + 32 + 32  # title, column labels, the first row's caption
    assert (picture[start:start + demo.CELL, -demo.BAR + 4:-demo.BAR + 18] == bar[:, 4:18]).all()
    mask_cell = picture[start:start + 40, 6 * demo.CELL:6 * demo.CELL + 120]
    assert (mask_cell == (0, 0, 255)).all(axis=2).sum() > 30  # "DEFECT" written in red on the projection's mask
    assert not np.array_equal(picture[start:start + 40, 5 * demo.CELL:5 * demo.CELL + 120], mask_cell)


def test_missing_shipped_models_say_how_to_get_them(monkeypatch, tmp_path):
    from eproj.errors import CheckpointError

    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="eproj demo --train"):
        demo.run_demo(tmp_path / "out")


def _shipped_path(name: str):
    path = demo.MODELS_DIR / f"{name}.pt"
    if not path.is_file():
        pytest.fail(f"shipped model {path} is missing; produce it with `{demo.train_command(name)}`")
    return path


@pytest.mark.parametrize("name", sorted(demo.SHIPPED))
def test_shipped_models_load_with_their_calibration(name):
    path = _shipped_path(name)
    trained = load_model(path)
    entry = demo.SHIPPED[name]
    assert trained.config.family == entry.family and trained.train["data"] == entry.data
    assert trained.train["steps"] == entry.steps
    assert trained.stop_threshold > 0
    weights = load_payload(path, MODEL_FORMAT)["model"]
    assert trained.train["weights"] == "float16"  # shipped small: the record says so, and the file holds them
    assert {str(v.dtype) for v in weights.values() if v.is_floating_point()} == {"torch.float16"}


def _spy_on_training(monkeypatch) -> list:
    """What `eproj train` is asked to train, as (out, ModelConfig, TrainConfig), instead of training."""
    import eproj.train.trainer as trainer

    seen: list = []
    monkeypatch.setattr(trainer, "train", lambda out, model_config, train_config, **_: seen.append(
        (Path(out), model_config, train_config)) or Path(out) / "model.pt")
    return seen


def _parsed_configs(command: str, monkeypatch):
    """The (ModelConfig, TrainConfig) `eproj train` builds from ``command``, without training."""
    from eproj.cli import build_parser

    seen = _spy_on_training(monkeypatch)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.func(args) == 0
    (_, model_config, train_config), = seen
    return model_config, train_config.resolved(model_config.family)


def test_demo_train_runs_each_printed_command(monkeypatch, tmp_path, capsys):
    seen = _spy_on_training(monkeypatch)
    paths = demo._models(tmp_path, retrain=True, steps=2)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training ")]
    assert printed == [f"training {name}: {demo.train_command(name, tmp_path / 'runs' / name, 2)}"
                       for name in demo.SHIPPED]
    assert [out for out, _, _ in seen] == [tmp_path / "runs" / name for name in demo.SHIPPED]
    assert paths == {name: tmp_path / "runs" / name / "model.pt" for name in demo.SHIPPED}
    unet = {out.name: (m, t) for out, m, t in seen}["grass-unet-puzzle"]
    assert unet[0].family == "unet" and unet[0].width == 16
    assert (unet[1].steps, unet[1].batch, unet[1].regime, unet[1].weight_decay, unet[1].weights) == (
        2, 8, "puzzle", 0.0, "float16")


@pytest.mark.parametrize("name", sorted(demo.SHIPPED))
def test_the_printed_command_reproduces_the_shipped_model_s_record(name, monkeypatch, tmp_path):
    """`eproj train` on the printed command (what `eproj demo --train` runs) trains the shipped
    model's network with its recorded options: every field of its train record, and the weight
    decay its optimizer used (0 where the record predates recording it)."""
    trained = load_model(_shipped_path(name))
    model_config, train_config = _parsed_configs(demo.train_command(name, tmp_path / name), monkeypatch)
    assert model_config == trained.config
    want = train_config.record()
    got = {"weight_decay": 0.0, "adv_weight": 0.0, "regime": "plain", "corruption": "patches", "fit": None,
           "fgsm_eps": 0.01, **trained.train}
    assert {k: got[k] for k in want} == want


def test_the_unet_command_carries_its_options():
    from eproj.cli import build_parser

    command = demo.train_command("grass-unet-puzzle", "my runs/grass", steps=7)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.data, args.model, args.steps, args.batch, args.lr) == ("textures:grass", "unet", 7, 8, 1e-3)
    assert (args.regime, args.weight_decay, args.weights, args.out) == ("puzzle", 0.0, "float16", "my runs/grass")
    assert demo.train_command("grass-l2ae") == ("eproj train --data textures:grass --model l2ae --steps 12000 "
                                                "--lr 0.0002 --weights float16 --out runs/grass-l2ae")


@pytest.mark.slow
def test_demo_train_retrains_from_scratch(monkeypatch, tmp_path):
    """One model end to end (the l2ae: its calibration is the cheapest); that every shipped model,
    the U-Net too, is trained with its printed command is ``test_demo_train_runs_each_printed_command``."""
    from eproj.cli import main

    monkeypatch.setattr(demo, "SHIPPED", {"grass-l2ae": demo.SHIPPED["grass-l2ae"]})
    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path / "nothing-shipped")
    assert main(["--threads", "2", "demo", "--train", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    trained = load_model(tmp_path / "out" / "runs" / "grass-l2ae")
    assert trained.train["steps"] == 2 and trained.train["weights"] == "float16"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["models"]["grass-l2ae"]["model"] == str(tmp_path / "out" / "runs" / "grass-l2ae" / "model.pt")
    assert (tmp_path / "out" / "grass-l2ae.png").is_file()
