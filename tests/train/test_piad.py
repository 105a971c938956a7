import math

import numpy as np
import pytest
import torch
from torch import nn

from eproj.errors import CheckpointError, ConfigError, DataError
from eproj.train import piad as P
from eproj.train.perceptual import FeatureStats, build_feature_network, relative_perceptual_l1



pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- ranges and shapes

def test_images_map_between_0_1_and_minus_1_1_at_the_model_boundary():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(P.to_model_range(x), torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    torch.testing.assert_close(P.from_model_range(P.to_model_range(x)), x)
    torch.manual_seed(0)
    model = P.PIAD(P.PIADConfig(size=8, width=4, latent=3))
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        inside = model.generator(model.encoder(images * 2 - 1))
        torch.testing.assert_close(model.reconstruct(images), (inside + 1) / 2)
        torch.testing.assert_close(model.encode(images), model.encoder(images * 2 - 1))


@pytest.mark.parametrize("size", [64, 128])
def test_network_shapes(size):
    config = P.PIADConfig(size=size, channels=3, width=8, latent=16)
    model, critics = P.PIAD(config), P.Critics(config)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 16)
        assert model.generate(z).shape == (2, 3, size, size)
        assert critics.image(x * 2 - 1).shape == (2,)
        assert critics.latent(z).shape == (2,)
    n = int(math.log2(size / 4))
    assert len(model.encoder.blocks) == n and len(critics.image.blocks) == n
    assert len(model.generator.blocks) == n + 1  # BlockUp x n, then a plain pre-activation block
    assert critics.latent.layers[0].out_features == 64  # 4 x latent (Tables 1, 2, 4)
    assert critics.image.conv4.in_channels == 9  # width + the minibatch-stddev channel


def test_default_recipe_and_config_checks():
    config = P.PIADConfig()
    assert (config.size, config.width, config.latent, config.critic_hidden) == (64, 32, 64, 256)
    assert P.PIADConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="power of 2 >= 8, got 48"):
        P.PIADConfig(size=48)
    with pytest.raises(ConfigError, match="channels must be 1 or 3, got 2"):
        P.PIADConfig(channels=2)
    with pytest.raises(ConfigError, match=r"unknown PIAD config fields \['depth'\]"):
        P.PIADConfig.from_dict({"depth": 3})
    with pytest.raises(ConfigError, match="gamma reduction must be one of"):
        P.PIADTrainConfig(gamma_reduction="max")
    train = P.PIADTrainConfig()
    assert (train.n_dis, train.gp_weight, train.drift_weight, train.lr_critics, train.lr_generator,
            train.beta1, train.beta2, train.n_weight, train.batch) == (2, 10.0, 0.001, 5e-4, 2e-4, 0.5, 0.99, 100, 32)


def test_blocks_resample_and_use_1x1_skips_only_when_widths_change():
    up, down, same = P.PreActBlock(4, 6, "up"), P.PreActBlock(4, 6, "down"), P.PreActBlock(4, 4)
    x = torch.randn(1, 4, 8, 8)
    assert up(x).shape == (1, 6, 16, 16) and down(x).shape == (1, 6, 4, 4) and same(x).shape == (1, 4, 8, 8)
    assert up.skip.kernel_size == (1, 1) and same.skip is None
    # the pre-activation block without resampling: x + conv2(lrelu(conv1(lrelu(x))))
    with torch.no_grad():
        act = lambda t: torch.nn.functional.leaky_relu(t, 0.2)  # noqa: E731
        torch.testing.assert_close(same(x), x + same.conv2(act(same.conv1(act(x)))))
        # BlockDown: avgpool of the main path plus avgpool of the 1x1-convolved skip
        main = torch.nn.functional.avg_pool2d(down.conv2(act(down.conv1(act(x)))), 2)
        torch.testing.assert_close(down(x), main + torch.nn.functional.avg_pool2d(down.skip(x), 2))


def test_kaiming_fan_out_init_and_zero_biases():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3)
    P.kaiming_init(conv)
    fan_out = 128 * 9
    expected = math.sqrt(2 / (1 + 0.2 ** 2)) / math.sqrt(fan_out)
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.all(conv.bias == 0)


def test_minibatch_stddev_appends_the_mean_batch_std():
    x = torch.randn(4, 3, 2, 2)
    out = P.MinibatchStddev()(x)
    expected = x.std(dim=0, correction=0).mean()
    assert out.shape == (4, 4, 2, 2)
    torch.testing.assert_close(out[:, 3], torch.full((4, 2, 2), float(expected)), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- WGAN-GP

class _Quadratic(nn.Module):
    """D(x) = sum(a * x^2) per sample: grad = 2 a x, known in closed form."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x):
        return (self.a * x * x).flatten(1).sum(1)


def test_gradient_penalty_matches_the_closed_form_gradient():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 3, dtype=torch.float64)
    critic = _Quadratic(a.clone())
    real, fake = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    eps = torch.rand(4, dtype=torch.float64)
    mixed = eps.view(-1, 1, 1, 1) * real + (1 - eps.view(-1, 1, 1, 1)) * fake
    norms = (2 * a * mixed).flatten(1).norm(dim=1)
    expected = ((norms - 1) ** 2).mean()
    gp = P.gradient_penalty(critic, real, fake, eps)
    torch.testing.assert_close(gp, expected)
    # and it is differentiable in the critic's parameters (the critic is trained on it)
    gp.backward()
    assert critic.a.grad is not None and critic.a.grad.abs().sum() > 0


def test_gradient_penalty_matches_per_sample_autograd_on_a_real_critic():
    """D_Z has no cross-sample terms: each sample's input gradient, taken alone, must agree."""
    torch.manual_seed(1)
    critic = P.LatentCritic(P.PIADConfig(size=8, latent=5)).double()
    real, fake = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    eps = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    terms = []
    for i in range(3):
        point = (eps[i] * real[i] + (1 - eps[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        grad, = torch.autograd.grad(critic(point).sum(), point)
        terms.append((grad.norm() - 1) ** 2)
    torch.testing.assert_close(P.gradient_penalty(critic, real, fake, eps), torch.stack(terms).mean())


def test_critic_loss_is_eq5_with_drift():
    critic = nn.Linear(2, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.6, 0.8]]))  # ||grad|| = 1: the penalty vanishes
        critic.bias.fill_(0.5)
    flat = lambda t: critic(t).flatten()  # noqa: E731
    real, fake = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss, logs = P.critic_loss(flat, real, fake, gp_weight=10.0, drift_weight=0.001)
    d_real, d_fake = torch.tensor([1.1, 1.3]), torch.tensor([0.5, 1.9])
    expected = d_fake.mean() - d_real.mean() + 0.001 * (d_real ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert logs["gp"] == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------- gradient-normalising weights

class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def test_gradient_stds_and_the_selected_weight_match_a_hand_computation():
    toy = _Toy()
    with torch.no_grad():
        toy.a.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        toy.b.weight.copy_(torch.tensor([3.0, -1.0]).view(1, 2, 1, 1))
    x = torch.full((1, 1, 1, 1), 2.0)
    # loss 1 = out = x (3 a1 - a2) ... : d/da = x * b = (6, -2), d/db = x * a = (2, 4)
    # loss 2 = out^2 = (x (3 - 2))^2 = 4: d/da = 2 out x b = 8 (3, -1) = (24, -8), d/db = 8 (1, 2) = (8, 16)
    normalizer = P.GradientNormalizer(history_size=200, smoothing=0.05)
    toy.zero_grad()
    toy(x).sum().backward()
    assert P.conv_gradient_stds(toy) == pytest.approx({"a": 4.0, "b": 1.0})  # population std of (6, -2), (2, 4)
    normalizer.record("adv_G", toy)
    toy.zero_grad()
    (toy(x) ** 2).sum().backward()
    normalizer.record("rec_G", toy)  # stds 16 and 4
    normalizer.select()
    assert normalizer.gamma_G == pytest.approx(0.25)  # mean over layers of 4/16 and 1/4
    assert normalizer.gamma_E == 1.0  # not measured yet


def test_select_weight_smooths_then_averages_ratios_over_the_last_entries():
    h1 = {"a": [1.0, 3.0, 2.0], "b": [2.0, 2.0, 2.0]}
    h2 = {"a": [1.0, 1.0, 1.0], "b": [4.0, 4.0, 1.0]}
    alpha = 0.5
    # smoothed a1 = (1, 2, 2), a2 = (1, 1, 1); b1 = (2, 2, 2), b2 = (4, 4, 2.5)
    assert P.exponential_smoothing(h1["a"], alpha) == [1.0, 2.0, 2.0]
    last_two_a = (2 / 1 + 2 / 1) / 2
    last_two_b = (2 / 4 + 2 / 2.5) / 2
    assert P.select_weight(h1, h2, alpha, last_n=2) == pytest.approx((last_two_a + last_two_b) / 2)
    three_layers = {**h1, "c": [9.0]}, {**h2, "c": [1.0]}
    assert P.select_weight(*three_layers, alpha, last_n=2, reduction="median") == pytest.approx(last_two_a)
    assert P.select_weight({"a": [1.0]}, {"a": [0.0]}, alpha, last_n=1) is None  # vanished rec gradients


def test_history_keeps_the_last_entries_and_round_trips():
    toy = _Toy()
    normalizer = P.GradientNormalizer(history_size=3)
    for scale in range(5):
        toy.zero_grad()
        (toy(torch.ones(1, 1, 1, 1)) * (scale + 1)).sum().backward()
        normalizer.record("adv_E", toy)
    assert len(normalizer.history["adv_E"]["a"]) == 3
    kept = normalizer.history["adv_E"]["a"]  # the measurements at scales 3, 4, 5
    assert kept[2] == pytest.approx(5 * kept[0] / 3) and kept[1] == pytest.approx(4 * kept[0] / 3)
    other = P.GradientNormalizer(history_size=3)
    other.load_state_dict(normalizer.state_dict())
    assert other.state_dict() == normalizer.state_dict()


# ---------------------------------------------------------------- training

class _Textures:
    """A tiny training source: smooth random images (N, C, S, S) float32 in [0, 1]."""

    def __init__(self, size: int = 16, channels: int = 3) -> None:
        self.size, self.channels = size, channels

    def train_batch(self, rng, batch):
        base = rng.random((batch, self.channels, self.size // 4, self.size // 4)).astype(np.float32)
        return np.ascontiguousarray(base.repeat(4, axis=2).repeat(4, axis=3))


def _tiny(steps, **kw):
    config = P.PIADConfig(size=16, width=4, latent=4)
    settings = {"steps": steps, "batch": 3, "n_dis": 2, "n_weight": 1, "checkpoint_every": 1, "stats_images": 5}
    train = P.PIADTrainConfig(**{**settings, **kw})
    return config, train


def _features():
    torch.manual_seed(123)
    return build_feature_network("efficientnet-lite0", tap="stage3", allow_random=True)


def test_training_step_weights_reconstruction_gradients_by_gamma():
    """With gamma forced, the E/G gradients equal adv + gamma * rec gradients (Eqs. 8-9)."""
    config, train = _tiny(1, n_dis=1)
    train = P.PIADTrainConfig(**{**train.to_dict(), "n_weight": 1000})  # no re-selection at step 1
    net = _features()
    torch.manual_seed(0)
    state = P.PIADState.new(config, train, FeatureStats(torch.zeros(40), torch.ones(40), "identity"))
    state.normalizer.gamma_G, state.normalizer.gamma_E = 3.0, 0.5
    x01 = torch.rand(3, 3, 16, 16)
    grads = {}
    captured = {}
    original = state.opt_generator.step

    def capture():
        captured.update({n: p.grad.clone() for n, p in state.model.named_parameters()})
        original()
    state.opt_generator.step = capture
    torch.manual_seed(5)
    P.training_step(state, net, [x01, x01], step=1, train=train)
    # recompute the two gradients separately with the same z (the critic step drew one z first)
    torch.manual_seed(0)  # the same initial E and G as ``state``
    state2 = P.PIADState.new(config, train, state.stats)
    torch.manual_seed(5)
    z_critic = torch.randn(3, 4)  # noqa: F841  (consumed by the critic step)
    torch.rand(3)  # the GP interpolation weights of D_X
    torch.rand(3)  # and of D_Z
    z = torch.randn(3, 4)
    # the critics after their update in the first run, so the adversarial terms see the same D
    state2.critics.load_state_dict(state.critics.state_dict())
    E, G = state2.model.encoder, state2.model.generator
    adv = -state2.critics.image(G(z)).mean() - state2.critics.latent(E(x01 * 2 - 1)).mean()
    rec = relative_perceptual_l1(net, state.stats, x01, (G(E(x01 * 2 - 1)) + 1) / 2).mean()
    for name, loss in (("adv", adv), ("rec", rec)):
        state2.model.zero_grad()
        loss.backward(retain_graph=True)
        grads[name] = {n: p.grad.clone() for n, p in state2.model.named_parameters()}
    for n in captured:
        gamma = 3.0 if n.startswith("generator") else 0.5
        torch.testing.assert_close(captured[n], grads["adv"][n] + gamma * grads["rec"][n], rtol=1e-4, atol=1e-6)


def test_training_resumes_from_its_checkpoint_with_identical_state(tmp_path):
    config, train2 = _tiny(2)
    _, train1 = _tiny(1)
    features = {"network": "efficientnet-lite0", "tap": "stage3", "weights": "random (test)"}
    source = _Textures()
    straight = P.train_piad(tmp_path / "straight", config, train2, source, _features(), features, progress=False)
    P.train_piad(tmp_path / "resumed", config, train1, source, _features(), features, progress=False)
    resumed = P.train_piad(tmp_path / "resumed", config, train2, source, _features(), features, progress=False)
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a["step"] == b["step"] == 2
    for key in ("encoder", "generator", "image_critic", "latent_critic"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ("opt_critics", "opt_generator"):
        for idx, s in a[key]["state"].items():
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(s[name], b[key]["state"][idx][name]), (key, idx, name)
    assert a["normalizer"] == b["normalizer"]
    assert len(a["normalizer"]["history"]["rec_G"]["out"]) == 2  # n_weight 1: measured at both steps
    assert a["normalizer"]["gamma_G"] != 1.0 and math.isfinite(a["normalizer"]["gamma_E"])
    assert a["stats"]["source"] == "training-images" and a["stats"]["count"] == 5
    assert a["stats"]["mean"].shape == (40,)
    # the weights moved
    fresh = P.PIAD(config)
    assert not torch.equal(fresh.generator.out.weight, a["generator"]["out.weight"])


def test_resume_refuses_other_settings_and_bad_data(tmp_path):
    config, train = _tiny(1)
    features = {"network": "efficientnet-lite0", "tap": "stage3", "weights": "random (test)"}
    P.train_piad(tmp_path, config, train, _Textures(), _features(), features, progress=False)
    with pytest.raises(CheckpointError, match=r"n_dis 2 \(now 1\)"):
        P.train_piad(tmp_path, config, P.PIADTrainConfig(**{**train.to_dict(), "n_dis": 1}), _Textures(),
                     _features(), features, progress=False)
    with pytest.raises(CheckpointError, match="feature network"):
        P.train_piad(tmp_path, config, train, _Textures(), _features(), {**features, "tap": "stage4"},
                     progress=False)
    with pytest.raises(CheckpointError, match="was trained with"):
        P.train_piad(tmp_path, P.PIADConfig(size=16, width=8, latent=4), train, _Textures(), _features(),
                     features, progress=False)
    with pytest.raises(DataError, match=r"batches \(3, 3, 16, 16\) float32.*\(3, 1, 16, 16\)"):
        P.train_piad(tmp_path / "new", config, train, _Textures(channels=1), _features(), features,
                     progress=False)


class _Interrupting(_Textures):
    """Raises KeyboardInterrupt on its ``at``-th batch."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.calls, self.at = 0, at

    def train_batch(self, rng, batch):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().train_batch(rng, batch)


def test_an_interrupt_between_steps_saves_the_last_finished_step(tmp_path):
    config, train = _tiny(5, checkpoint_every=100)
    features = {"network": "efficientnet-lite0", "tap": "stage3", "weights": "random (test)"}
    # 2 batches for the 5 statistics images, 3 per step: the 6th draw is the 2nd step's first
    with pytest.raises(KeyboardInterrupt):
        P.train_piad(tmp_path, config, train, _Interrupting(at=6), _features(), features, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1


def test_a_diverged_step_is_not_saved(tmp_path, monkeypatch):
    config, train = _tiny(3)
    features = {"network": "efficientnet-lite0", "tap": "stage3", "weights": "random (test)"}
    real_step = P.training_step
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        logs = real_step(*args, **kwargs)
        return {**logs, "rec": float("nan")} if len(calls) == 2 else logs
    monkeypatch.setattr(P, "training_step", diverging)
    with pytest.raises(CheckpointError, match="diverged at step 2"):
        P.train_piad(tmp_path, config, train, _Textures(), _features(), features, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1


def test_training_data_out_of_range_is_refused(tmp_path):
    class Bright(_Textures):
        def train_batch(self, rng, batch):
            return super().train_batch(rng, batch) * 2

    config, train = _tiny(1)
    with pytest.raises(DataError, match=r"finite and in \[0, 1\], got a batch in \[0\.\d+, 1\.\d+\]"):
        P.train_piad(tmp_path, config, train, Bright(), _features(), {"network": "x"}, progress=False)


def test_anomaly_score_is_eq1():
    torch.manual_seed(0)
    model = P.PIAD(P.PIADConfig(size=16, width=4, latent=4))
    net = _features()
    stats = FeatureStats(torch.zeros(40), torch.full((40,), 2.0), "identity")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(P.anomaly_score(model, net, stats, x),
                                   relative_perceptual_l1(net, stats, x, model.reconstruct(x)))


def test_piad_from_checkpoint_gives_the_trained_model_and_refuses_others(tmp_path):
    config, train = _tiny(1)
    features = {"network": "efficientnet-lite0", "tap": "stage3", "weights": "random (test)"}
    path = P.train_piad(tmp_path, config, train, _Textures(), _features(), features, progress=False)
    model, stats, record, step = P.piad_from_checkpoint(path)
    payload = torch.load(path, weights_only=True)
    assert step == 1 and record == features and not model.training
    assert torch.equal(model.generator.out.weight, payload["generator"]["out.weight"])
    assert torch.equal(stats.std, payload["stats"]["std"])
    payload["encoder"]["out.weight"] = torch.zeros(7, 4, 1, 1)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a valid PIAD checkpoint.*out.weight"):
        P.piad_from_checkpoint(tmp_path / "bad.pt")
    payload["format"] = "eproj-checkpoint"
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not an eproj-piad-checkpoint file"):
        P.piad_from_checkpoint(tmp_path / "other.pt")
