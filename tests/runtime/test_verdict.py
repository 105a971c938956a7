"""The calibrated verdict on a shipped model's bundle: frames unlike any normal frame are
defects, a mask with a large region is never "no defect", and the frame range, image score
and gate come from the model's calibration."""

import numpy as np
import pytest

from eproj.decision import UNLIKE_NORMAL, largest_region
from eproj.runtime import Inspector

MODELS = ("grass-vae", "brick-l2ae", "grass-unet-puzzle", "brick-unet-corrupt")


@pytest.fixture(scope="module")
def shipped_bundles(tmp_path_factory):
    from eproj.demo import MODELS_DIR
    from eproj.export.onnx_graphs import export_bundle

    root = tmp_path_factory.mktemp("shipped")
    for name in MODELS:
        export_bundle(MODELS_DIR / f"{name}.pt", root / name)
    return root


def _frames() -> dict[str, np.ndarray]:
    from eproj.train.data import load_source

    rng = np.random.default_rng(0)
    test = load_source("textures:brick", size=128).test()
    defective = next(s for s in test if s.label == 1)
    return {"grey": np.full((128, 128), 128, np.uint8), "black": np.zeros((128, 128), np.uint8),
            "noise": rng.integers(0, 256, (128, 128), dtype=np.uint8),
            "brick defect": np.round(defective.image[:, :, 0] * 255).astype(np.uint8)}


@pytest.mark.parametrize("name", MODELS)
def test_frames_unlike_any_normal_frame_are_defects(shipped_bundles, name):
    inspector = Inspector.from_bundle(shipped_bundles / name, backend="onnxruntime", threads=1, fit="none")
    assert inspector.decision.frame_range is not None  # the shipped models are calibrated with one
    frames = _frames()
    results = dict(zip(frames, inspector(list(frames.values()))))
    for what in ("grey", "black", "noise"):
        r = results[what]
        assert r.defect, (what, r.score, r.reason)
        assert r.reason == UNLIKE_NORMAL or r.mask.any(), what
    for what, r in results.items():  # the verdict and the mask agree
        if largest_region(r.mask) >= inspector.decision.min_region_area:
            assert r.defect, what


def test_the_calibration_is_applied(shipped_bundles):
    inspector = Inspector.from_bundle(shipped_bundles / "brick-l2ae", backend="onnxruntime", threads=1,
                                      fit="none")
    manifest = inspector.bundle.manifest
    assert manifest["stop_rule"] == "validation" and set(manifest["stop_rules"]) == {"validation", "training-min"}
    rule = manifest["stop_rules"]["validation"]
    assert inspector.config.stop_threshold == rule["stop_threshold"]
    assert inspector.config.max_iters == rule["max_iters"]
    assert inspector.gate_lr == rule["gate_lr"] == manifest["decision"]["gate_lr"]
    old = Inspector.from_bundle(shipped_bundles / "brick-l2ae", backend="onnxruntime", threads=1, fit="none",
                                stop_rule="training-min")
    assert old.config.stop_threshold == manifest["lr_stats"]["min"] and old.gate_lr == float("-inf")
    with pytest.raises(Exception, match="stop_rule must be one of"):
        Inspector.from_bundle(shipped_bundles / "brick-l2ae", backend="onnxruntime", stop_rule="fastest")
