"""The U-Net's adversarial term (eproj.train.adversarial) and Adam's weight decay in training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_mvtec
from eproj.errors import CheckpointError, ConfigError
from eproj.train.adversarial import (Adversary, Discriminator, discriminator_loss, feature_matching_loss)
from eproj.train.checkpoint import CHECKPOINT_FORMAT, load_payload, save_atomic
from eproj.train.models import ModelConfig


def test_discriminator_is_dcgan_shaped():
    d = Discriminator(channels=3, size=32, width=4)
    convs = [m for m in d.body if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in d.body if isinstance(m, torch.nn.BatchNorm2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] * 3  # 32 -> 16 -> 8 -> 4
    assert len(norms) == 2 and isinstance(d.body[1], torch.nn.LeakyReLU)  # no batch norm after the first
    assert all(m.negative_slope == 0.2 for m in d.body if isinstance(m, torch.nn.LeakyReLU))
    x = torch.rand(5, 3, 32, 32)
    assert d.features(x).shape == (5, 16, 4, 4) and d(x).shape == (5,)
    with pytest.raises(ValueError, match="power-of-two"):
        Discriminator(1, 48)


def test_feature_matching_and_discriminator_losses_follow_their_formulas():
    torch.manual_seed(0)
    d = Discriminator(channels=1, size=16, width=2).eval()  # eval: batch norm by running statistics, per sample
    real, restored = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16, requires_grad=True)
    with torch.no_grad():
        want = sum(float(((d.features(real[i:i + 1]) - d.features(restored[i:i + 1])) ** 2).sum())
                   for i in range(3)) / 3
    loss = feature_matching_loss(d, real, restored)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    same = feature_matching_loss(d, real, real)
    assert float(same) == 0.0
    bce = float(discriminator_loss(d, real, restored))
    p_real, p_fake = torch.sigmoid(d(real)), torch.sigmoid(d(restored))
    want_bce = float(-(torch.log(p_real)).mean() - torch.log(1 - p_fake).mean())
    assert bce == pytest.approx(want_bce, rel=1e-5)
    assert bce == pytest.approx(float(F.binary_cross_entropy(p_real, torch.ones(3))
                                      + F.binary_cross_entropy(p_fake, torch.zeros(3))), rel=1e-5)


def test_the_generator_term_leaves_the_discriminator_alone_and_its_step_moves_it():
    torch.manual_seed(1)
    adversary = Adversary(channels=1, size=16, width=2)
    real, restored = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16, requires_grad=True)
    adversary.generator_term(real, restored).backward()
    assert all(p.grad is None for p in adversary.discriminator.parameters())
    assert all(p.requires_grad for p in adversary.discriminator.parameters())
    before = [p.detach().clone() for p in adversary.discriminator.parameters()]
    adversary.step(real, restored)
    assert any(not torch.equal(a, p) for a, p in zip(before, adversary.discriminator.parameters()))
    group = adversary.optimizer.param_groups[0]
    assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.999)


def _config(folder, **options):
    from eproj.train.trainer import TrainConfig

    return TrainConfig(data=f"mvtec:{folder}", batch=2, lr=1e-3, **options)


def test_adversarial_training_resumes_with_its_discriminator(tmp_path):
    from eproj.train.trainer import train

    folder = make_mvtec(tmp_path / "mvtec" / "nut", size=32, n_train=4)
    model_config = ModelConfig(family="unet", size=32, width=4)
    run, straight = tmp_path / "run", tmp_path / "straight"
    train(straight, model_config, _config(folder, steps=3, regime="puzzle", adv_weight=0.02),
          calibrate_after=False, progress=False)
    train(run, model_config, _config(folder, steps=2, regime="puzzle", adv_weight=0.02),
          calibrate_after=False, progress=False)
    payload = load_payload(run / "checkpoint.pt", CHECKPOINT_FORMAT)
    assert payload["train"]["adv_weight"] == 0.02 and payload["train"]["adversarial"]["weight"] == 0.02
    assert payload["adversary"]["optimizer"]["state"]  # D has taken steps
    train(run, model_config, _config(folder, steps=3, regime="puzzle", adv_weight=0.02),
          calibrate_after=False, progress=False)
    resumed = load_payload(run / "checkpoint.pt", CHECKPOINT_FORMAT)
    whole = load_payload(straight / "checkpoint.pt", CHECKPOINT_FORMAT)
    for key in ("model", ):
        for name, value in whole[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=1e-5, atol=1e-6)
    for name, value in whole["adversary"]["model"].items():
        torch.testing.assert_close(resumed["adversary"]["model"][name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"--adv-weight 0.02 \(now 0\)"):
        train(run, model_config, _config(folder, steps=4, regime="puzzle"), calibrate_after=False, progress=False)
    with pytest.raises(ConfigError, match="--model unet"):
        train(tmp_path / "ae", ModelConfig(family="l2ae", size=32), _config(folder, steps=1, adv_weight=0.02),
              calibrate_after=False, progress=False)
    with pytest.raises(ConfigError, match="cevae"):
        _config(folder, regime="corrupt", corruption="cevae", adv_weight=0.02)
    with pytest.raises(ConfigError, match="adv weight must be a finite number >= 0"):
        _config(folder, adv_weight=-1.0)


def test_weight_decay_is_the_unets_recipe_and_an_old_checkpoint_resumes_with_its_own(tmp_path, capsys):
    from eproj.train.trainer import UNET_WEIGHT_DECAY, train

    folder = make_mvtec(tmp_path / "mvtec" / "nut", size=32, n_train=4)
    model_config = ModelConfig(family="unet", size=32, width=4)
    run = tmp_path / "run"
    train(run, model_config, _config(folder, steps=1), calibrate_after=False, progress=False)
    payload = load_payload(run / "checkpoint.pt", CHECKPOINT_FORMAT)
    assert payload["train"]["weight_decay"] == UNET_WEIGHT_DECAY == 1e-5
    assert payload["optimizer"]["param_groups"][0]["weight_decay"] == 1e-5
    with pytest.raises(CheckpointError, match=r"--weight-decay 1e-05 \(now 0.001\)"):
        train(run, model_config, _config(folder, steps=2, weight_decay=1e-3), calibrate_after=False, progress=False)
    ae = tmp_path / "ae"
    train(ae, ModelConfig(family="l2ae", size=32), _config(folder, steps=1), calibrate_after=False, progress=False)
    assert load_payload(ae / "checkpoint.pt", CHECKPOINT_FORMAT)["train"]["weight_decay"] == 0.0
    # a checkpoint written before the weight decay was recorded: Adam without it
    old = dict(payload, train={k: v for k, v in payload["train"].items() if k != "weight_decay"})
    old["optimizer"] = {**payload["optimizer"],
                        "param_groups": [{**g, "weight_decay": 0.0} for g in payload["optimizer"]["param_groups"]]}
    save_atomic(old, run / "checkpoint.pt")
    capsys.readouterr()
    train(run, model_config, _config(folder, steps=2), calibrate_after=False, progress=False)
    assert "does not record its weight decay; it trained with 0" in capsys.readouterr().err
    resumed = load_payload(run / "checkpoint.pt", CHECKPOINT_FORMAT)
    assert resumed["step"] == 2 and resumed["train"]["weight_decay"] == 0.0
    assert resumed["optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="weight decay must be a finite number >= 0"):
        _config(folder, weight_decay=float("nan"))
    assert np.isfinite(resumed["train"]["lr"])
