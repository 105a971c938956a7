"""The puzzle regime (eproj.train.puzzle) and its wiring into training."""

import numpy as np
import pytest
import torch

from conftest import make_mvtec
from eproj.errors import CheckpointError, ConfigError
from eproj.train.models import ModelConfig, build_model
from eproj.train.puzzle import (LUMA, corrupt_tile, fgsm, make_puzzles, permutation_errors, permutation_kind,
                                permutation_scores, permutation_set, permute_tiles)


def test_permutation_sets():
    every, swaps = permutation_set("all"), permutation_set("swaps")
    assert every.shape == (23, 4) and swaps.shape == (6, 4)
    for orders in (every, swaps):
        assert len({tuple(o) for o in orders}) == len(orders)
        assert all(sorted(o) == [0, 1, 2, 3] for o in orders.tolist())
        assert [0, 1, 2, 3] not in orders.tolist()
    assert all(int((o != np.arange(4)).sum()) == 2 for o in swaps)
    assert permutation_kind("tile") == "swaps" and permutation_kind("resize") == "all"
    with pytest.raises(ConfigError, match="one of"):
        permutation_set("three")


def test_permute_tiles_moves_whole_tiles_and_inverts():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    swapped = permute_tiles(x, [1, 0, 2, 3])  # top-left and top-right exchanged
    assert np.array_equal(swapped[:, :, :2, :2], x[:, :, :2, 2:]) and np.array_equal(swapped[:, :, 2:], x[:, :, 2:])
    for order in permutation_set("all"):
        inverse = np.argsort(order)
        assert np.array_equal(permute_tiles(permute_tiles(x, order), inverse), x)
        assert torch.equal(permute_tiles(torch.from_numpy(x), order), torch.from_numpy(permute_tiles(x, order)))
    with pytest.raises(ValueError, match="even size"):
        permute_tiles(np.zeros((1, 1, 5, 5)), [1, 0, 2, 3])


def test_one_tile_is_blacked_out_or_turned_gray():
    rng = np.random.default_rng(0)
    gray = rng.random((2, 1, 8, 8)).astype(np.float32)
    out = corrupt_tile(gray, np.array([3, 0]))
    assert np.all(out[0, :, 4:, 4:] == 0) and np.array_equal(out[0, :, :4], gray[0, :, :4])
    assert np.all(out[1, :, :4, :4] == 0) and np.array_equal(out[1, :, 4:], gray[1, :, 4:])
    colour = rng.random((1, 3, 8, 8)).astype(np.float32)
    out = corrupt_tile(colour, np.array([1]))
    tile = out[0, :, :4, 4:]
    np.testing.assert_allclose(tile, np.broadcast_to(np.tensordot(LUMA, colour[0, :, :4, 4:], axes=(0, 0)), tile.shape),
                               rtol=1e-6)
    assert np.array_equal(out[0, :, 4:], colour[0, :, 4:]) and np.array_equal(out[0, :, :4, :4], colour[0, :, :4, :4])
    before = colour.copy()
    corrupt_tile(colour, np.array([2]))
    assert np.array_equal(colour, before)  # the input is left unchanged


def test_puzzles_are_drawn_per_sample_from_the_allowed_set():
    images = np.random.default_rng(1).random((64, 1, 8, 8)).astype(np.float32)
    puzzled, orders, tiles = make_puzzles(np.random.default_rng(2), images, "swaps")
    assert puzzled.shape == images.shape and puzzled.dtype == np.float32
    assert {tuple(o) for o in orders} == {tuple(o) for o in permutation_set("swaps")}  # all six appear
    assert set(tiles.tolist()) == {0, 1, 2, 3}
    restored = permute_tiles(puzzled, [np.argsort(o) for o in orders])
    np.testing.assert_array_equal(restored, corrupt_tile(images, tiles))
    again, _, _ = make_puzzles(np.random.default_rng(2), images, "swaps")
    assert np.array_equal(again, puzzled)  # seeded: a resumed run draws the same puzzles


def test_fgsm_stays_within_eps_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="unet", size=32, width=4))
    x = torch.rand(2, 1, 32, 32)
    puzzled = torch.from_numpy(make_puzzles(np.random.default_rng(0), x.numpy(), "all")[0])

    def loss_fn(m, inputs, target):
        return ((m(inputs) - target) ** 2).sum()

    assert fgsm(model, puzzled, x, 0.0, loss_fn) is puzzled
    adversarial = fgsm(model, puzzled, x, 0.01, loss_fn)
    assert not adversarial.requires_grad
    assert float((adversarial - puzzled).abs().max()) <= 0.01 + 1e-7
    assert float((adversarial - puzzled).abs().mean()) > 0.004  # one signed step of 1.25 eps moved it
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert float(loss_fn(model, adversarial, x)) > float(loss_fn(model, puzzled, x))


def test_permutation_scores_are_normalised_per_permutation():
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="unet", size=32, width=4)).eval()
    x = torch.rand(3, 1, 32, 32)
    errors = permutation_errors(model, x, "swaps")
    assert errors.shape == (6, 3, 1, 32, 32)
    with torch.no_grad():
        first = (model(permute_tiles(x, permutation_set("swaps")[0])) - x) ** 2
    torch.testing.assert_close(errors[0], first)
    raw = permutation_scores(errors)
    mean = raw.mean(dim=1)
    torch.testing.assert_close(permutation_scores(errors, mean).mean(dim=1), torch.ones(6))
    with pytest.raises(ValueError, match="one positive mean per permutation"):
        permutation_scores(errors, mean[:3])


def test_puzzle_and_corrupt_regimes_train_the_unet_and_resume(tmp_path):
    from eproj.train.checkpoint import CHECKPOINT_FORMAT, load_payload
    from eproj.train.trainer import TrainConfig, train

    folder = make_mvtec(tmp_path / "mvtec" / "nut", size=32, n_train=4)
    model_config = ModelConfig(family="unet", size=32, width=4)
    run = tmp_path / "puzzle"
    config = TrainConfig(data=f"mvtec:{folder}", steps=2, batch=2, lr=1e-3, regime="puzzle")
    train(run, model_config, config, calibrate_after=False, progress=False)
    payload = load_payload(run / "checkpoint.pt", CHECKPOINT_FORMAT)
    assert payload["config"]["family"] == "unet" and payload["config"]["width"] == 4
    puzzle = payload["train"]["puzzle"]
    assert (puzzle["permutations"], puzzle["K"], puzzle["draw"], puzzle["fgsm_eps"]) == ("all", 23, "per sample", 0.01)
    with pytest.raises(CheckpointError, match=r"fgsm_eps 0.01 \(now 0.02\)"):
        train(run, model_config, TrainConfig(**{**config.__dict__, "steps": 3, "fgsm_eps": 0.02}),
              calibrate_after=False, progress=False)
    with pytest.raises(CheckpointError, match="regime puzzle"):
        train(run, model_config, TrainConfig(**{**config.__dict__, "steps": 3, "regime": "corrupt"}),
              calibrate_after=False, progress=False)
    train(run, model_config, TrainConfig(**{**config.__dict__, "steps": 3}), calibrate_after=False, progress=False)
    assert load_payload(run / "checkpoint.pt", CHECKPOINT_FORMAT)["step"] == 3
    corrupt = tmp_path / "corrupt"
    train(corrupt, model_config, TrainConfig(data=f"mvtec:{folder}", steps=1, batch=2, regime="corrupt"),
          calibrate_after=False, progress=False)
    assert "puzzle" not in load_payload(corrupt / "checkpoint.pt", CHECKPOINT_FORMAT)["train"]
    with pytest.raises(ConfigError, match=r"FGSM eps must be a number in \[0, 1\)"):
        TrainConfig(data="x", fgsm_eps=-0.1)


def test_permutation_maps_sum_to_the_normalised_mean_score():
    from eproj.train.puzzle import permutation_maps, permutation_normaliser

    torch.manual_seed(0)
    model = build_model(ModelConfig(family="unet", size=32, width=4)).eval()
    validation = np.random.default_rng(0).random((5, 1, 32, 32)).astype(np.float32)
    normaliser = permutation_normaliser(model, validation, "swaps", batch=2)
    want = permutation_scores(permutation_errors(model, torch.from_numpy(validation), "swaps")).double().mean(dim=1)
    torch.testing.assert_close(normaliser, want)
    scores, maps = permutation_maps(model, torch.from_numpy(validation), "swaps", normaliser)
    assert scores.shape == (5,) and maps.shape == (5, 32, 32)
    torch.testing.assert_close(scores.mean().double(), torch.tensor(1.0, dtype=torch.float64))  # Eq. 6 on its own data
    torch.testing.assert_close(maps.flatten(1).sum(dim=1), scores)
    with pytest.raises(ValueError, match="at least one"):
        permutation_normaliser(model, validation[:0], "swaps")


def test_calibration_carries_the_permutation_normalisers_of_validation_images(tmp_path):
    from eproj.train.checkpoint import load_model
    from eproj.train.puzzle import permutation_calibration, permutation_maps, permutation_normaliser
    from eproj.train.trainer import TrainConfig, train

    torch.manual_seed(0)
    model = build_model(ModelConfig(family="unet", size=32, width=4)).eval()
    normal = np.random.default_rng(3).random((7, 1, 32, 32)).astype(np.float32)
    entry = permutation_calibration(model, normal, "tile", 0.9, batch=3)
    assert entry["kind"] == "swaps" and entry["orders"] == permutation_set("swaps").tolist()
    want = permutation_normaliser(model, normal, "swaps")
    np.testing.assert_allclose(entry["normaliser"], want.numpy(), rtol=1e-6)  # batches of 3 against 16
    scores, maps = permutation_maps(model, torch.from_numpy(normal), "swaps", want)
    assert entry["score_threshold"] == pytest.approx(float(np.quantile(scores.numpy(), 0.9)), rel=1e-5)
    assert entry["map_threshold"] == pytest.approx(float(np.quantile(maps.numpy(), 0.9)), rel=1e-5)
    assert entry["validation_images"] == 7
    folder = make_mvtec(tmp_path / "mvtec" / "nut", size=32, n_train=4)
    run = tmp_path / "run"
    train(run, ModelConfig(family="unet", size=32, width=4),
          TrainConfig(data=f"mvtec:{folder}", steps=1, batch=2, lr=1e-3, regime="puzzle"), progress=False)
    calibration = load_model(run / "model.pt").calibration
    assert calibration["permutation"]["kind"] == "all" and len(calibration["permutation"]["normaliser"]) == 23
    assert all(v > 0 for v in calibration["permutation"]["normaliser"])
