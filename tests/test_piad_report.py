"""reports/piad/make_report.py: PIAD's report (image AUROC, pixel metrics per map, the score
ablation) on a tiny PIAD run, beside rows of another report."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "reports" / "piad" / "make_report.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_piad_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_torch_thread")
def test_the_report_evaluates_piad_beside_other_models(tmp_path):
    from eproj.errors import ConfigError
    from eproj.train.piad import PIADTrainConfig
    from eproj.train.piad_networks import PIADConfig
    from eproj.train.piad_run import run_piad

    path = run_piad(tmp_path / "grass-piad", "textures:grass", PIADConfig(size=16, channels=1, width=4, latent=4),
                    PIADTrainConfig(steps=2, batch=4, n_dis=1, stats_images=16), progress=False)
    other = {"results": [{"model": "eproj/models/grass-l2ae.pt", "family": "l2ae", "data": "textures:grass",
                          "train": {"steps": 12000}, "test_images": 48, "defective_images": 37,
                          "metrics": {"dssim_projection": {"pixel_auroc": 0.6, "aupro_0.3": 0.5,
                                                           "image_auroc": 0.7}}}]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    l2 = run_piad(tmp_path / "grass-piad-l2", "textures:grass", PIADConfig(size=16, channels=1, width=4, latent=4),
                  PIADTrainConfig(steps=2, batch=4, n_dis=1, stats_images=16, reconstruction_loss="l2"),
                  progress=False)
    report = _script()
    assert report.main([str(path), str(l2), "--out", str(tmp_path / "report"),
                        "--shipped", str(tmp_path / "other.json")]) == 0
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    result, l2_result = payload["results"]
    # the l2 model against the rel_perc_l1 one, own score against own score, paired over the same crops
    difference, = payload["own_loss_differences"]
    assert (difference["loss"], difference["against"]) == ("l2", str(path))
    assert difference["difference"] == pytest.approx(l2_result["image_auroc"]["l2"] - result["image_auroc"]["rel_perc_l1"])
    lo, hi = difference["interval"]
    assert lo <= difference["difference"] <= hi
    for k, (lo, hi) in result["image_auroc_interval"].items():
        assert lo <= result["image_auroc"][k] <= hi
    assert len(result["image_scores"]["l2"]) == len(result["labels"]) == 48
    assert set(result["image_auroc"]) == set(report.ABLATION) and set(result["maps"]) == set(report.PIAD_MAPS)
    assert all(0 <= v <= 1 for v in result["image_auroc"].values())
    assert result["test_size"] == 128 and result["step"] == 2 and result["test_images"] == 48
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.index("### Image AUROC") < text.index("### Pixel metrics") < text.index("### Ablation")
    assert "grass-l2ae — l2ae, 12000 steps (shipped) | max of DSSIM proj. | 0.700 |" in text
    # the first table scores each PIAD model by its own score, the one its verdict uses
    first = text[text.index("### Image AUROC"):text.index("### Pixel metrics")]
    assert f"| rel-perc-L1 (A(x)) | {result['image_auroc']['rel_perc_l1']:.3f} |" in first
    assert f"| L2 (pixel MSE) | {l2_result['image_auroc']['l2']:.3f} |" in first
    ablation = next(line for line in text.splitlines() if "| rel_perc_l1 |" in line)
    assert ablation.endswith("] * |")  # the model's own loss, the last column, with its interval
    assert "- grass-piad-l2 (l2) − grass-piad: " in text
    assert payload["command"].startswith(".venv/bin/python reports/piad/make_report.py")
    # --keep: the l2 model evaluated again, the other row carried over from the report above
    assert report.main([str(l2), "--out", str(tmp_path / "again"), "--keep", str(tmp_path / "report" / "report.json"),
                        "--shipped", str(tmp_path / "other.json")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["models"] == [str(path), str(l2)] and again["evaluated"] == [str(l2)]
    kept, fresh = again["results"]
    assert kept["kept_from"] == {"report": str(tmp_path / "report" / "report.json"), "command": payload["command"]}
    assert "kept_from" not in fresh and fresh["image_scores"] == l2_result["image_scores"]
    assert kept["image_scores"] == result["image_scores"] and again["own_loss_differences"] == [difference]
    assert f"- grass-piad: `{payload['command']}`" in (tmp_path / "again" / "report.md").read_text()
    # rows tested on another split are refused
    other["results"][0]["defective_images"] = 30
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="tested on 48 images \\(30 defective\\), this split has 48 \\(37\\)"):
        report.main([str(path), "--out", str(tmp_path / "r2"), "--shipped", str(tmp_path / "other.json")])


def test_own_loss_differences_refuse_rows_tested_on_other_images():
    from eproj.errors import ConfigError

    def row(model, loss, images):
        return {"model": model, "data": "textures:grass", "train": {"reconstruction_loss": loss},
                "images": images, "labels": [0, 1, 1], "image_auroc": {loss: 0.5},
                "image_scores": {loss: [0.1, 0.2, 0.3]}}

    report = _script()
    base = row("runs/grass-piad/model.pt", "rel_perc_l1", ["a", "b", "c"])
    assert report.own_loss_differences([base, row("runs/grass-piad-perc/model.pt", "perc", ["a", "b", "c"])])
    with pytest.raises(ConfigError, match="tested on different images of textures:grass"):
        report.own_loss_differences([base, row("runs/grass-piad-perc/model.pt", "perc", ["a", "b", "d"])])


def test_kept_rows_must_share_the_test_split(tmp_path):
    from eproj.errors import ConfigError

    def row(model, images, labels=(0, 1, 1)):
        return {"model": model, "data": "textures:grass", "images": images, "labels": list(labels)}

    report = _script()
    earlier = tmp_path / "report.json"
    earlier.write_text(json.dumps({"command": "make it", "results": [row("a.pt", ["x", "y", "z"]),
                                                                      row("b.pt", ["x", "y", "z"])]}))
    merged = report.keep_rows([row("b.pt", ["x", "y", "z"]), row("c.pt", ["x", "y", "z"])], earlier)
    assert [r["model"] for r in merged] == ["a.pt", "b.pt", "c.pt"]
    assert [r.get("kept_from") for r in merged] == [{"report": str(earlier), "command": "make it"}, None, None]
    with pytest.raises(ConfigError, match="b.pt and a.pt were tested on different images or labels"):
        report.keep_rows([row("b.pt", ["x", "y", "w"])], earlier)
    with pytest.raises(ConfigError, match="b.pt and a.pt were tested on different images or labels"):
        report.keep_rows([row("b.pt", ["x", "y", "z"], (1, 1, 1))], earlier)
    with pytest.raises(ConfigError, match="no such report.json"):
        report.keep_rows([], tmp_path / "none.json")
