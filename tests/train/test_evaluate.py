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
    # 1e-5: float32 convolutions over a batch of six tiles and over one may sum in different orders
    # (seen: 1.07e-6 on one pixel of the map); a tile off by one pixel is wrong by about 1e-2
    np.testing.assert_allclose(result.maps["dssim"][32:64, 64:96], alone.maps["dssim"][0], atol=1e-5)
    np.testing.assert_allclose(result.target[32:64, 64:96, 0], alone.target[0, 0], atol=1e-5)
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


def test_a_sample_that_never_moved_is_mapped_by_its_scaled_reconstruction(tiny_model):
    """Stopped at x0 (Lr under the stop threshold), the projection is x0 and DSSIM(x0, x0) is all
    zeros: the map is DSSIM(x0, f(x0)) times the zero-iteration scale instead (fail closed)."""
    model = tiny_model("l2ae", dtype=torch.float32)
    x = np.random.default_rng(4).random((2, 1, 32, 32)).astype(np.float32)
    stopped = run_method(model, x, "projection", ProjectionConfig(max_iters=5, stop_threshold=1e9),
                         zero_map_scale=0.25)
    assert stopped.iterations.tolist() == [0, 0] and stopped.stop_reason == ["threshold", "threshold"]
    with torch.no_grad():
        recon = dssim_map(torch.from_numpy(x), model(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(stopped.maps["dssim"], 0.25 * recon, rtol=1e-5, atol=1e-7)
    assert stopped.maps["dssim"].max() > 0
    moved = run_method(model, x, "projection", ProjectionConfig(max_iters=2), zero_map_scale=0.25)
    assert moved.iterations.tolist() == [2, 2]
    with torch.no_grad():
        plain = dssim_map(torch.from_numpy(x), torch.from_numpy(moved.target)).numpy()
    np.testing.assert_allclose(moved.maps["dssim"], plain, rtol=1e-5, atol=1e-7)


def test_the_gate_in_the_evaluation(tiny_model):
    model = tiny_model("l2ae", dtype=torch.float32)
    x = np.random.default_rng(4).random((2, 1, 32, 32)).astype(np.float32)
    gated = run_method(model, x, "projection", ProjectionConfig(max_iters=5), gate_threshold=1e9)
    assert gated.iterations.tolist() == [1, 1] and gated.stop_reason == ["gate", "gate"]
    assert gated.maps["dssim"].max() > 0 and gated.lr0.shape == (2,) and gated.rec_error.shape == (2, 32, 32)
    # no step: judged by the reconstruction's map, scaled; never the all-zero DSSIM(x0, x0)
    gated = run_method(model, x, "projection", ProjectionConfig(max_iters=5), gate_threshold=1e9,
                       gate_first_update=False)
    assert gated.iterations.tolist() == [0, 0] and gated.maps["dssim"].max() > 0
    scaled = run_method(model, x, "projection", ProjectionConfig(max_iters=5), gate_threshold=1e9,
                        zero_map_scale=2.0, gate_first_update=False)
    np.testing.assert_allclose(scaled.maps["dssim"], 2 * gated.maps["dssim"], rtol=1e-6)


def test_the_progress_bar_counts_tiles_and_says_which_are_in_flight(capsys):
    from eproj.train.evaluate import _chunks

    assert list(_chunks(70, 32, True, "projection l2ae")) == [0, 32, 64]
    err = capsys.readouterr().err
    assert "0/70" in err and "tiles 1-32 in flight" in err and "tiles 65-70 in flight" in err
    assert list(_chunks(5, 32, False, "quiet")) == [0] and capsys.readouterr().err == ""
