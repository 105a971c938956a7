import pytest
import torch

from eproj.errors import ConfigError
from eproj.train.projection import ProjectionConfig, energy_terms, project

FAMILIES = ("l2ae", "dsae", "vae", "gvae")


def _energy(model, x, x0, lam):
    from eproj.train.losses import reconstruction_loss

    with torch.no_grad():
        return reconstruction_loss(model, x)[0] + lam * (x - x0).abs().flatten(1).sum(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_energy_gradient_against_finite_differences(tiny_model, family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 32, 32, generator=g, dtype=torch.float64)
    x = (x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(0.05, 0.95)
    lam = 0.05
    energy, loss, rec, grad = energy_terms(model, x, x0, lam)
    torch.testing.assert_close(energy, _energy(model, x, x0, lam))
    eps = 1e-6
    for _ in range(6):
        idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in x.shape)
        xp, xm = x.clone(), x.clone()
        xp[idx] += eps
        xm[idx] -= eps
        numeric = (_energy(model, xp, x0, lam)[idx[0]] - _energy(model, xm, x0, lam)[idx[0]]) / (2 * eps)
        assert float(grad[idx]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("weighting,step,alpha", [("hadamard", "plain", 0.5), ("none", "plain", 0.002),
                                                  ("hadamard", "adam", 0.002), ("none", "adam", 0.002)])
def test_projection_lowers_the_energy(tiny_model, weighting, step, alpha):
    model = tiny_model("l2ae")
    x0 = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    config = ProjectionConfig(alpha=alpha, weighting=weighting, step=step, max_iters=15)
    start = _energy(model, x0, x0, config.lam)
    result = project(model, x0, config)
    end = _energy(model, result.projection, x0, config.lam)
    assert (end < start).all()
    torch.testing.assert_close(result.energy, end)
    assert (result.iterations == 15).all()
    assert result.stop_reason == ["max_iters"] * 3
    assert float(result.projection.min()) >= 0 and float(result.projection.max()) <= 1


def test_pixels_outside_the_known_mask_never_change(tiny_model):
    model = tiny_model("vae")
    x0 = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
    mask[:, :, 8:20, 5:25] = 1
    for step in ("plain", "adam"):
        config = ProjectionConfig(alpha=0.01, weighting="mask", step=step, max_iters=10)
        out = project(model, x0, config, mask=mask).projection
        assert torch.equal(out[mask == 0], x0[mask == 0])
        assert not torch.equal(out[mask == 1], x0[mask == 1])


def test_per_sample_stopping(tiny_model):
    model = tiny_model("l2ae")
    x0 = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x0[1] = model(x0[1:2]).detach()[0]  # already on the manifold: Lr tiny
    lr0 = _energy(model, x0, x0, 0.0)
    threshold = float(lr0[1]) * 1.01
    assert float(lr0[0]) > threshold and float(lr0[2]) > threshold
    config = ProjectionConfig(alpha=0.5, max_iters=5, stop_threshold=threshold)
    result = project(model, x0, config)
    assert int(result.iterations[1]) == 0 and result.stop_reason[1] == "threshold"
    assert torch.equal(result.projection[1], x0[1])
    assert (result.iterations[[0, 2]] > 0).all()
    # the others evolve exactly as they would alone: finished samples do not disturb the batch
    alone = project(model, x0[[0, 2]], config)
    torch.testing.assert_close(alone.projection, result.projection[[0, 2]])
    torch.testing.assert_close(alone.iterations, result.iterations[[0, 2]])


def test_the_zero_iteration_gate(tiny_model):
    """A sample with Lr(x0) at most the gate keeps the first update and takes no further step
    (reason "gate", Lr(x0) recorded), or with gate_first_update=False takes no step at all
    (projection x0); the others run exactly as without the gate."""
    model = tiny_model("l2ae")
    x0 = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0[0] = model(x0[0:1]).detach()[0]  # on the manifold: Lr far under the others
    lr0 = _energy(model, x0, x0, 0.0)
    gate = float(lr0[0]) * 1.01
    config = ProjectionConfig(alpha=0.5, max_iters=4)
    gated = project(model, x0, config, gate_threshold=gate)
    assert gated.stop_reason == ["gate", "max_iters", "max_iters"]
    assert gated.iterations.tolist() == [1, 4, 4]
    torch.testing.assert_close(gated.loss[0], lr0[0])
    one = project(model, x0[:1], config.with_(max_iters=1))
    torch.testing.assert_close(gated.projection[0], one.projection[0])  # the first update, no more
    assert not torch.equal(gated.projection[0], x0[0])
    plain = project(model, x0, config)
    torch.testing.assert_close(plain.projection[1:], gated.projection[1:])
    still = project(model, x0, config, gate_threshold=gate, gate_first_update=False)
    assert still.stop_reason == gated.stop_reason and still.iterations.tolist() == [0, 4, 4]
    assert torch.equal(still.projection[0], x0[0])  # no step at all
    torch.testing.assert_close(still.loss[0], lr0[0])
    torch.testing.assert_close(plain.projection[1:], still.projection[1:])
    assert project(model, x0, config, gate_threshold=None).stop_reason == ["max_iters"] * 3
    # with a bound on the reconstruction error's largest pixel, a sample must pass both
    worst = ((x0 - model(x0).detach()) ** 2).mean(dim=1).flatten(1).amax(dim=1)
    assert worst[0] < worst[1:].min()
    loose = project(model, x0, config, gate_threshold=1e9, gate_rec_error=float(worst[0]) * 1.01)
    assert loose.stop_reason == ["gate", "max_iters", "max_iters"]
    torch.testing.assert_close(loose.projection, gated.projection)
    tight = project(model, x0, config, gate_threshold=gate, gate_rec_error=float(worst[0]) * 0.99)
    assert tight.stop_reason == ["max_iters"] * 3
    # under the stop threshold at x0, a gated run keeps the first update too (never a map of zeros)
    stopped = project(model, x0, config.with_(stop_threshold=gate), gate_threshold=-1.0)
    assert stopped.stop_reason[0] == "gate" and stopped.iterations.tolist() == [1, 4, 4]
    assert project(model, x0, config.with_(stop_threshold=gate)).iterations.tolist() == [0, 4, 4]


def test_energy_convergence_stops_a_sample(tiny_model):
    model = tiny_model("l2ae")
    x0 = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    result = project(model, x0, ProjectionConfig(alpha=1e-9, energy_tol=1e-3, max_iters=50))
    assert result.stop_reason == ["converged", "converged"]
    assert (result.iterations == 1).all()


def test_bad_projection_arguments(tiny_model):
    model = tiny_model("l2ae")
    x0 = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    with pytest.raises(ConfigError, match="mask"):
        project(model, x0, ProjectionConfig(weighting="mask"))
    with pytest.raises(ConfigError, match="mask"):
        project(model, x0, ProjectionConfig(), mask=torch.ones_like(x0))
    with pytest.raises(ConfigError, match=r"\(N, 1 or C, H, W\)"):
        project(model, x0, ProjectionConfig(weighting="mask"), mask=torch.ones(1, 1, 16, 16))
    with pytest.raises(ConfigError, match="N, C, H, W"):
        project(model, x0[0], ProjectionConfig())
    for bad in (dict(alpha=0), dict(step="lbfgs"), dict(weighting="x"), dict(max_iters=-1), dict(lam=-1)):
        with pytest.raises(ConfigError):
            ProjectionConfig(**bad)


@pytest.mark.parametrize("family,weighting,step", [("vae", "hadamard", "plain"), ("dsae", "mask", "adam"),
                                                   ("gvae", "none", "plain")])
def test_projection_creates_every_tensor_on_the_input_device(tiny_model, family, weighting, step):
    """With torch's default device set to "meta", a tensor the projection creates without the
    input's device lands on meta and mixes with the CPU inputs (as a CPU tensor would with CUDA
    inputs): the run must not notice the default device at all."""
    model = tiny_model(family)
    x0 = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.ones(2, 1, 32, 32, dtype=torch.float64) if weighting == "mask" else None
    config = ProjectionConfig(alpha=0.5 if step == "plain" else 0.01, max_iters=3, weighting=weighting, step=step)
    expected = project(model, x0, config, mask)
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        result = project(model, x0, config, mask)
    finally:
        torch.set_default_device(previous)
    for tensor in (result.projection, result.iterations, result.loss, result.energy):
        assert tensor.device == x0.device
    torch.testing.assert_close(result.projection, expected.projection)
    assert result.stop_reason == expected.stop_reason
