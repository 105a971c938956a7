"""The corruption generator and the corrupt training regime."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_mvtec
from eproj.errors import CheckpointError, ConfigError
from eproj.train.corruption import CORRUPTIONS, PRESETS, CorruptionConfig, corrupt


def _batch(n=6, size=48):
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, size, size)).astype(np.float32) * 0.5 + 0.25
    return np.ascontiguousarray(x)


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("shape", ["star", "square"])
def test_only_the_regions_change(kind, shape):
    x = _batch()
    config = CorruptionConfig(kinds=(kind,), shape=shape, probability=1.0)
    y, masks = corrupt(np.random.default_rng(1), x, config)
    assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    changed = (y != x).any(axis=1)
    assert not (changed & ~masks).any()  # nothing outside a region
    assert masks.any(axis=(1, 2)).all()  # every sample got a region
    assert changed.sum() > 0.5 * masks.sum() or kind == "shuffle"  # shuffling may move equal values
    area = masks.mean(axis=(1, 2))
    assert (area <= 2 * config.max_area + 0.02).all()
    again, _ = corrupt(np.random.default_rng(1), x, config)
    np.testing.assert_array_equal(y, again)  # seeded


def test_probability_zero_leaves_the_batch_alone():
    x = _batch()
    y, masks = corrupt(np.random.default_rng(0), x, CorruptionConfig(probability=0.0))
    np.testing.assert_array_equal(y, x)
    assert not masks.any()


def test_bad_configs():
    with pytest.raises(ConfigError, match="corruption kinds must be"):
        CorruptionConfig(kinds=("blur",))
    with pytest.raises(ConfigError, match="region areas"):
        CorruptionConfig(min_area=0.3, max_area=0.1)
    assert PRESETS["cevae"].shape == "square" and PRESETS["cevae"].kinds == ("noise",)


@pytest.mark.parametrize("family,corruption", [("l2ae", "patches"), ("vae", "cevae"), ("dsae", "patches")])
def test_the_corrupt_regime_trains_and_records_its_parameters(tmp_path, family, corruption):
    from eproj.train.checkpoint import load_model
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    data = make_mvtec(tmp_path / "mvtec" / "nut", size=32)
    config = TrainConfig(data=f"mvtec:{data}", steps=3, batch=4, regime="corrupt", corruption=corruption)
    model = ModelConfig(family=family, size=32, latent=8)
    trained = load_model(train(tmp_path / "run", model, config, progress=False))
    assert trained.train["regime"] == "corrupt" and trained.train["corruption"] == corruption
    assert trained.train["corruption_config"] == PRESETS[corruption].to_dict()
    with pytest.raises(CheckpointError, match="was trained with regime corrupt"):
        train(tmp_path / "run", model, TrainConfig(data=f"mvtec:{data}", steps=4, batch=4), progress=False)


def test_regime_options_are_checked():
    from eproj.train.trainer import TrainConfig

    with pytest.raises(ConfigError, match="regime must be one of"):
        TrainConfig(data="textures:brick", regime="noisy")
    with pytest.raises(ConfigError, match="corruption must be one of"):
        TrainConfig(data="textures:brick", corruption="blur")
