"""eproj eval --method PREDICTOR, eproj report and eproj sweep on tiny models."""

from __future__ import annotations

import json

import pytest

from conftest import make_mvtec
from eproj.cli import main


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("report")
    data = make_mvtec(root / "mvtec" / "nut", size=32, n_test=4)
    runs = {}
    for family, regime in (("vae", "plain"), ("l2ae", "corrupt")):
        runs[family] = train(root / family, ModelConfig(family=family, size=32, latent=8),
                             TrainConfig(data=f"mvtec:{data}", steps=3, batch=4, regime=regime), progress=False)
    return root, f"mvtec:{data}", runs


def test_eval_accepts_every_predictor(tiny_runs, tmp_path, capsys):
    _, _, runs = tiny_runs
    out = tmp_path / "kl.json"
    assert main(["eval", str(runs["vae"]), "--method", "kl_grad", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["metrics"]) >= {"kl_grad", "combi", "ensemble", "dssim_projection"}
    assert result["split"]["fit"] and result["split"]["evaluate"] > 0
    assert '"pixel_auroc"' in capsys.readouterr().out
    assert main(["eval", str(runs["l2ae"]), "--method", "kl_grad", "--json", str(out)]) == 2
    assert "kl_grad needs a variational family" in capsys.readouterr().err


def test_report_writes_json_and_markdown(tiny_runs, tmp_path):
    _, _, runs = tiny_runs
    out = tmp_path / "report"
    assert main(["report", str(runs["vae"]), str(runs["l2ae"]), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| model | DSSIM recon. | DSSIM proj. | Rec-Error |" in text and "Made by `eproj report" in text
    rows = [line for line in text.splitlines() if line.startswith("| vae") or line.startswith("| l2ae")]
    assert "corrupt (patches)" in text and any("—" in r for r in rows)  # l2ae has no gradient predictors
    results = json.loads((out / "report.json").read_text())["results"]
    assert [r["family"] for r in results] == ["vae", "l2ae"]


def test_sweep_trains_one_model_per_value(tiny_runs, tmp_path):
    _, data, _ = tiny_runs
    out = tmp_path / "sweep"
    assert main(["sweep", "--data", data, "--parameter", "beta", "--values", "0.5,2", "--steps", "2", "--size",
                 "32", "--out", str(out)]) == 0
    text = (out / "sweep.md").read_text()
    assert "| beta = 0.5 |" in text and "| beta = 2 |" in text and "## AUPRO" in text
    assert main(["sweep", "--data", data, "--model", "l2ae", "--parameter", "beta", "--values", "1", "--steps",
                 "2", "--size", "32", "--out", str(out)]) == 2


def test_the_runtime_applies_a_stored_ensemble(tiny_runs, tmp_path, capsys):
    import numpy as np
    import torch

    from eproj.predictors import ensemble_map, predictor_maps
    from eproj.runtime import Inspector
    from eproj.train.checkpoint import load_model
    from eproj.train.predictors import reference_ingredients

    _, _, runs = tiny_runs
    fitted = tmp_path / "ensemble.json"
    assert main(["eval", str(runs["vae"]), "--method", "ensemble", "--json", str(fitted)]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", str(runs["vae"]), "--out", str(bundle), "--ensemble", str(fitted)]) == 0
    inspector = Inspector.from_bundle(bundle, backend="onnxruntime", method="ensemble", fit="none", max_iters=4)
    x0 = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    results = inspector([x[0] for x in x0])
    trained = load_model(runs["vae"])
    model = json.loads(fitted.read_text())["ensemble"]
    reference = ensemble_map(predictor_maps(reference_ingredients(trained.model, torch.from_numpy(x0),
                                                                  inspector.config), tuple(model["features"])), model)
    got = np.stack([r.anomaly_map for r in results])
    np.testing.assert_allclose(got, reference, atol=1e-3)
    assert all(r.mask.dtype == bool for r in results) and inspector.pixel_threshold == 0.5
    assert main(["export", str(runs["vae"]), "--out", str(tmp_path / "b2"), "--ensemble", str(tmp_path)]) == 2
    assert main(["export", str(runs["l2ae"]), "--out", str(tmp_path / "b3"), "--ensemble", str(fitted)]) == 2
    assert "needs a variational family" in capsys.readouterr().err


def test_threads_reach_torch_and_onnx_runtime(tiny_runs, tmp_path, monkeypatch):
    """``eproj --threads N report|sweep|eval`` runs torch and the runtime on N threads
    (a sweep beside other jobs oversubscribed the cores without it)."""
    import torch

    from eproj.runtime.predictors import StepIngredients

    _, _, runs = tiny_runs
    seen = []
    original = StepIngredients.__init__

    def spy(self, bundle, threads=0, **projection):
        seen.append(threads)
        original(self, bundle, threads, **projection)

    monkeypatch.setattr(StepIngredients, "__init__", spy)
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "report", str(runs["l2ae"]), "--out", str(tmp_path / "r")]) == 0
        assert torch.get_num_threads() == 1 and seen == [1]
    finally:
        torch.set_num_threads(before)


def test_the_reports_projection_map_is_the_inspectors_calibrated_map(tiny_runs, tmp_path):
    """The report scores the projection's map as the runtime reports it: each tile's DSSIM map
    on the scale of its step count (gated tiles included), not the raw DSSIM to the projection."""
    import numpy as np

    from eproj.export.onnx_graphs import export_bundle
    from eproj.predictor_eval import tile_maps
    from eproj.predictors import PredictorConfig
    from eproj.runtime import Inspector
    from eproj.train.checkpoint import load_model
    from eproj.train.data import load_source, to_batch

    _, data, runs = tiny_runs
    trained = load_model(runs["vae"])
    bundle = export_bundle(trained, tmp_path / "bundle").parent
    tiles = to_batch([s.image for s in load_source(data, size=32).test()])
    maps = tile_maps(trained, tiles, bundle, PredictorConfig(), progress=False, threads=1)
    with Inspector.from_bundle(bundle, backend="onnxruntime", fit="none", channel_order="rgb",
                               threads=1) as inspector:
        expected = np.stack([r.anomaly_map for r in inspector([t.transpose(1, 2, 0) for t in tiles])])
    np.testing.assert_allclose(maps["dssim_projection"], expected, rtol=1e-5, atol=1e-6)
