"""benchmarks/tile_stride.py: its validation frames and its stride choice."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tile_stride.py"


def _script():
    spec = importlib.util.spec_from_file_location("tile_stride", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frames_are_mirrored_validation_texture_with_defects_only_inside_their_masks():
    script = _script()
    rng = np.random.default_rng(3)
    region = rng.random((40, 56, 1)).astype(np.float32)
    foreign = [rng.random((64, 64, 1)).astype(np.float32)]
    frames = script.validation_frames(region, 96, 6, 2, 16, foreign, seed=5)
    assert [f["label"] for f in frames] == [1, 1, 0, 1, 1, 0]
    plane = np.pad(region, ((0, 400), (0, 400), (0, 0)), mode="symmetric")
    for f in frames:
        assert f["image"].shape == (96, 96, 1) and f["image"].dtype == np.float32
        assert f["mask"].any() == bool(f["label"]) and len(f["kinds"]) == 2 * f["label"]
        # the frame is a window of the mirrored region wherever no defect was drawn
        clean = f["image"][~f["mask"]]
        windows = [plane[y:y + 96, x:x + 96][~f["mask"]] for y in range(80) for x in range(112)]
        assert any(np.array_equal(clean, w) for w in windows)
    again = script.validation_frames(region, 96, 6, 2, 16, foreign, seed=5)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(frames, again))


def _rows(values: dict[int, tuple[float, float]]) -> list[dict]:
    return [{"setting": "calibrated", "stride": s, "metrics": {"pixel_auroc": a, "aupro": p}}
            for s, (a, p) in values.items()] + [
        {"setting": "100 iterations", "stride": 64, "metrics": {"pixel_auroc": 0.0, "aupro": 0.0}}]


def test_the_largest_stride_within_the_slack_on_every_model_is_chosen():
    script = _script()
    models = {"a": _rows({64: (0.98, 0.95), 96: (0.978, 0.946), 128: (0.97, 0.95)}),
              "b": _rows({64: (0.60, 0.50), 96: (0.61, 0.51), 128: (0.65, 0.55)})}
    choice = script.choose(models, 64, 0.005)
    assert choice["stride"] == 96
    assert choice["per_stride"]["128"].startswith("largest loss against stride 64: 0.0100 (a, pixel_auroc)")
    models["b"] = _rows({64: (0.60, 0.50), 96: (0.594, 0.51), 128: (0.65, 0.55)})
    assert script.choose(models, 64, 0.005)["stride"] == 64  # one model outside the slack is enough
