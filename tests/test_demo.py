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
    assert picture is not None and picture.shape[1] == demo.CELL * len(demo.COLUMNS)


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
