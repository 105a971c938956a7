import numpy as np
import pytest
import torch

from eproj.errors import ConfigError, DataError
from eproj.train.checkpoint import TrainedModel
from eproj.train.data import TestSample
from eproj.train.evaluate import projection_config, run_method, run_on_samples
from eproj.train.losses import dssim_map
from eproj.train.projection import ProjectionConfig


def _trained(model):
    calibration = {"stop_threshold": 1.0, "projection": ProjectionConfig(max_iters=3).to_dict(),
                   "segmentation": {m: {"dssim": 0.1, "l2": 0.01, "score": 0.2}
                                    for m in ("reconstruction", "projection")}}
    return TrainedModel(model, calibration, {}, "memory")


@pytest.mark.parametrize("method", ["reconstruction", "projection"])
def test_tiled_images_give_the_maps_of_their_tiles(tiny_model, method):
    model = tiny_model("l2ae", dtype=torch.float32)
    trained = _trained(model)
    rng = np.random.default_rng(0)
    image = rng.random((64, 96, 1)).astype(np.float32)
    sample = TestSample("big", image, np.zeros((64, 96), bool), 0, "good")
    config = projection_config(trained) if method == "projection" else None
    result, = run_on_samples(trained, [sample], method, config, progress=False)
    assert result.maps["dssim"].shape == (64, 96) and result.target.shape == (64, 96, 1)
    # the tile at rows 32:64, columns 64:96, computed alone
    tile = torch.from_numpy(image[32:64, 64:96].transpose(2, 0, 1)[None].copy())
    alone = run_method(model, tile.numpy(), method, config)
    np.testing.assert_allclose(result.maps["dssim"][32:64, 64:96], alone.maps["dssim"][0], atol=1e-6)
    np.testing.assert_allclose(result.target[32:64, 64:96, 0], alone.target[0, 0], atol=1e-6)
    assert result.score == pytest.approx(float(result.maps["dssim"].max()))


def test_reconstruction_maps_are_dssim_of_f(tiny_model):
    model = tiny_model("vae", dtype=torch.float32)
    x = np.random.default_rng(1).random((3, 1, 32, 32)).astype(np.float32)
    out = run_method(model, x, "reconstruction", batch=2)
    with torch.no_grad():
        expected = dssim_map(torch.from_numpy(x), model(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(out.maps["dssim"], expected, atol=1e-6)
    assert out.iterations.tolist() == [0, 0, 0] and out.stop_reason == ["none"] * 3


def test_method_errors(tiny_model):
    model = tiny_model("l2ae", dtype=torch.float32)
    x = np.zeros((1, 1, 32, 32), np.float32)
    with pytest.raises(ConfigError, match="method must be one of"):
        run_method(model, x, "magic")
    with pytest.raises(ConfigError, match="needs a ProjectionConfig"):
        run_method(model, x, "projection")
    rgb = TestSample("rgb", np.zeros((32, 32, 3), np.float32), None, 1, "x")
    with pytest.raises(DataError, match="expects 1 channel"):
        run_on_samples(_trained(model), [rgb], "reconstruction", None, progress=False)
