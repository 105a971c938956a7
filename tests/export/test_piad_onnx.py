"""A PIAD model.pt exported to ONNX (reconstruct and score graphs) and run without torch: the
graphs against PyTorch within 1e-4, the runtime's scores, maps and verdicts against the reference
evaluation, and eproj run on a PIAD bundle."""

import json

import cv2
import numpy as np
import pytest

from eproj.cli import main
from eproj.runtime.piad import PIADInspector, is_piad_bundle
from eproj.train.data import load_source
from eproj.train.piad import PIADTrainConfig
from eproj.train.piad_calibrate import load_piad_model, piad_on_samples
from eproj.train.piad_networks import PIADConfig
from eproj.train.piad_run import run_piad

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A calibrated 16 x 16 PIAD model of brick (gray) after 2 steps, and its bundle."""
    root = tmp_path_factory.mktemp("piad-export")
    run_piad(root / "run", "textures:brick", PIADConfig(size=16, channels=1, width=4, latent=4),
             PIADTrainConfig(steps=2, batch=4, n_dis=1, stats_images=16), progress=False)
    assert main(["--threads", "1", "export", str(root / "run"), "--out", str(root / "bundle")]) == 0
    return root


def test_export_writes_both_graphs_within_tolerance(bundle):
    manifest = json.loads((bundle / "bundle" / "manifest.json").read_text())
    assert is_piad_bundle(bundle / "bundle") and not is_piad_bundle(bundle / "run")
    assert manifest["size"] == 16 and manifest["channels"] == 1
    assert all((bundle / "bundle" / f).is_file() for f in manifest["graphs"].values())
    assert set(manifest["parity"]["max_difference"]) == {"reconstruction", "score", "feature_map"}
    assert max(manifest["parity"]["max_difference"].values()) <= 1e-4


def test_runtime_tiles_match_the_reference(bundle):
    trained = load_piad_model(bundle / "run")
    inspector = PIADInspector(bundle / "bundle", threads=1)
    x = np.random.default_rng(1).uniform(0, 1, (4, 1, 16, 16)).astype(np.float32)
    ref, got = trained.outputs(x), inspector.tiles(x)
    np.testing.assert_allclose(got["reconstruction"], ref["reconstruction"], atol=1e-4)
    np.testing.assert_allclose(got["score"], ref["rel_perc_l1"], atol=1e-4)
    np.testing.assert_allclose(got["feature"], ref["feature"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["dssim"], ref["dssim"], atol=1e-4)


def test_runtime_verdicts_match_the_reference_evaluation(bundle):
    trained = load_piad_model(bundle / "run")
    samples = load_source("textures:brick", size=16).test()[:3]
    reference = piad_on_samples(trained, samples)
    with PIADInspector(bundle / "bundle", threads=1) as inspector:
        results = inspector([s.image for s in samples])
    for ref, got in zip(reference, results):
        assert got.score == pytest.approx(ref["scores"]["rel_perc_l1"], abs=1e-4)
        assert (got.defect, got.reason) == (ref["defect"], ref["reason"])
        np.testing.assert_allclose(got.maps["feature"], ref["maps"]["feature"], atol=1e-4, rtol=1e-4)
        assert got.mask.shape == ref["sample"].image.shape[:2]


@pytest.mark.parametrize("where", ["feature", "dssim", "score", "reconstruction"])
def test_a_non_finite_output_fails_the_frame_closed(bundle, where):
    """A NaN in any map, in the reconstruction or in the score: the frame is failed and defective,
    with a finite score and a reason naming it, never a verdict read off NaN comparisons."""
    from eproj.runtime.inspector import FAILED_SCORE

    image = load_source("textures:brick", size=16).test()[0].image
    with PIADInspector(bundle / "bundle", threads=1) as inspector:
        tiles = inspector.tiles

        def poisoned(x):
            out = {k: np.array(v, copy=True) for k, v in tiles(x).items()}
            out[where].reshape(-1)[0] = np.nan
            return out

        inspector.tiles = poisoned
        result, = inspector([image])
    assert result.failed and result.defect and result.score == FAILED_SCORE
    assert "non-finite" in result.reason


def test_eproj_run_on_a_piad_bundle(bundle, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(frames / f"f{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["--threads", "1", "run", str(bundle / "bundle"), "--source", str(frames), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == ["f0.png", "f1.png"] and all(isinstance(r["score"], float) for r in lines)
    assert cv2.imread(str(out / "masks" / "f0.png.png"), cv2.IMREAD_GRAYSCALE).shape == (40, 48)
    capsys.readouterr()
    assert main(["run", str(bundle / "bundle"), "--source", str(frames), "--out", str(out), "--max-iters", "3"]) == 2
    assert "--max-iters 3 do not apply to a PIAD bundle" in capsys.readouterr().err
    assert main(["run", str(bundle / "bundle"), "--source", str(frames), "--out", str(out), "--tile-stride", "8"]) == 2
    assert "--tile-stride 8 do not apply to a PIAD bundle" in capsys.readouterr().err
    assert main(["export", str(bundle / "run"), "--out", str(tmp_path / "b"), "--fp16"]) == 2
    assert "--fp16 is for the projection's bundles" in capsys.readouterr().err
