"""reports/unet/make_report.py: the U-Net report's evaluation and tables, on a tiny unet run."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from conftest import make_mvtec

SCRIPT = Path(__file__).resolve().parents[1] / "reports" / "unet" / "make_report.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_unet_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_evaluates_every_map_and_the_puzzle_protocol(tmp_path):
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    folder = make_mvtec(tmp_path / "mvtec" / "nut", size=32, n_train=4)
    path = train(tmp_path / "nut-unet-puzzle", ModelConfig(family="unet", size=32, width=4),
                 TrainConfig(data=f"mvtec:{folder}", steps=2, batch=2, lr=1e-3, regime="puzzle"), progress=False)
    report = _script()
    assert report.main([str(path), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    result, = payload["results"]
    assert set(result["metrics"]) == set(report.MAPS)
    for metrics in result["metrics"].values():
        assert set(metrics) == {"pixel_auroc", "aupro_0.3", "image_auroc"}
        assert all(v is None or 0 <= v <= 1 for v in metrics.values())
    assert result["train"]["regime"] == "puzzle" and result["train"]["weight_decay"] == 1e-5
    protocol = result["puzzle_protocol"]
    assert set(protocol["puzzle"]) == {"image_auroc", "fpr_at_tpr_0.99", "fpr_at_tpr_0.995"}
    text = (tmp_path / "report" / "report.md").read_text()
    assert payload["command"].startswith(".venv/bin/python reports/unet/make_report.py")
    assert "| Residual | DSSIM recon. | Permutation | DSSIM proj. |" in text
    assert "nut-unet-puzzle — unet, puzzle, 2 steps" in text and result["train"]["steps_asked"] == 2 and "Puzzle-AE's image-level protocol" in text
    row = next(line for line in text.splitlines() if line.startswith("| nut-unet-puzzle") and "puzzle |" in line)
    assert f"{protocol['puzzle']['image_auroc']:.3f}" in row
    assert np.isfinite(result["seconds"])
    kept = result["defect_retention"]
    assert kept["crops"] > 0 and 0 <= kept["median"] and np.isfinite(kept["pooled"])
    assert "share of a synthetic defect the restoration keeps" in text


def test_defect_retention_is_one_for_a_copy_and_zero_for_a_constant(tmp_path):
    import torch

    from eproj.train.checkpoint import TrainedModel
    from eproj.train.models import ModelConfig, build_model

    folder = make_mvtec(tmp_path / "mvtec" / "nut", size=32, n_train=6)
    model = build_model(ModelConfig(family="unet", size=32, width=4))
    report = _script()

    class Copy(torch.nn.Module):
        config = model.config

        def forward(self, x):
            return x

    class Constant(Copy):
        def forward(self, x):
            return torch.full_like(x, 0.5)

    for module, want in ((Copy(), 1.0), (Constant(), 0.0)):
        kept = report.defect_retention(TrainedModel(module, {}, {}, "memory"), f"mvtec:{folder}")
        assert kept["pooled"] == want and kept["median"] == want


def test_a_shipped_run_is_listed_once(tmp_path):
    default_models = _script().default_models
    models, runs = tmp_path / "models", tmp_path / "runs"
    models.mkdir()
    (models / "grass-unet-puzzle.pt").write_bytes(b"same weights")
    (models / "other.pt").write_bytes(b"not brick or grass")
    for name, payload in (("grass-unet-puzzle", b"same weights"), ("grass-unet-plain", b"other weights")):
        (runs / name).mkdir(parents=True)
        (runs / name / "model.pt").write_bytes(payload)
    listed = default_models(models, (str(runs / "grass-unet-plain" / "model.pt"),
                                     str(runs / "grass-unet-puzzle" / "model.pt"),
                                     str(runs / "grass-unet-corrupt" / "model.pt")))
    assert listed == [str(models / "grass-unet-puzzle.pt"), str(runs / "grass-unet-plain" / "model.pt")]
