import json

import cv2
import pytest

from eproj import demo
from eproj.train.checkpoint import load_model


def test_demo_report_and_panels_on_a_tiny_model(monkeypatch, tmp_path):
    from conftest import make_mvtec
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    folder = make_mvtec(tmp_path / "mvtec" / "screw", size=32)
    path = train(tmp_path / "run", ModelConfig(family="l2ae", size=32, latent=8),
                 TrainConfig(data=f"mvtec:{folder}", steps=2, batch=4), progress=False)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.pt").write_bytes(path.read_bytes())
    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(demo, "SHIPPED", {"tiny": (f"mvtec:{folder}", "l2ae", 2, 1e-4)})
    report = demo.run_demo(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    entry = saved["models"]["tiny"]
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


@pytest.mark.parametrize("name", sorted(demo.SHIPPED))
def test_shipped_models_load_with_their_calibration(name):
    path = demo.MODELS_DIR / f"{name}.pt"
    if not path.is_file():
        pytest.fail(f"shipped model {path} is missing; produce it with `{demo.train_command(name)}`")
    trained = load_model(path)
    data, family, steps, _ = demo.SHIPPED[name]
    assert trained.config.family == family and trained.train["data"] == data
    assert trained.train["steps"] == steps
    assert trained.stop_threshold > 0


@pytest.mark.slow
def test_demo_train_retrains_from_scratch(monkeypatch, tmp_path):
    from eproj.cli import main

    monkeypatch.setattr(demo, "SHIPPED", {"grass-l2ae": ("textures:grass", "l2ae", 16000, 2e-4)})
    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path / "nothing-shipped")
    assert main(["--threads", "2", "demo", "--train", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    trained = load_model(tmp_path / "out" / "runs" / "grass-l2ae")
    assert trained.train["steps"] == 2 and trained.train["weights"] == "float16"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["models"]["grass-l2ae"]["model"] == str(tmp_path / "out" / "runs" / "grass-l2ae" / "model.pt")
    assert (tmp_path / "out" / "grass-l2ae.png").is_file()
