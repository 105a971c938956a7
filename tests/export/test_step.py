"""The analytic step module against autograd on the reference definitions."""

import numpy as np
import pytest
import torch
from skimage import data as skdata

from eproj.export.step import (StepModule, _layer_input_grad, gaussian_matrix, max_pool, max_pool_adjoint,
                               upsampling_matrix)
from eproj.train.losses import gaussian_filter, kl_divergence, reconstruction_loss
from eproj.train.models import FAMILIES, upsample

# (family, architecture, size) of the float64 checks: every autoencoder family on both of its
# architectures, and the U-Net on its own
SHAPES = [(f, a, s) for f in FAMILIES if f != "unet" for a, s in (("bergmann", 32), ("zimmerer", 64))] + \
    [("unet", "unet", 32), ("unet", "unet", 64)]


def _autograd(model, x):
    xg = x.clone().requires_grad_(True)
    loss, rec = reconstruction_loss(model, xg)
    grad, = torch.autograd.grad(loss.sum(), xg)
    out = {"reconstruction": rec.detach(), "loss": loss.detach(), "grad": grad}
    if model.config.variational:
        xk = x.clone().requires_grad_(True)
        mu, logvar = model.encode(xk)
        kl = kl_divergence(mu, logvar)
        out["kl"], = kl.detach(),
        out["kl_grad"], = torch.autograd.grad(kl.sum(), xk)
    return out


def _analytic(model, x):
    names = ["reconstruction", "loss", "grad", "kl", "kl_grad"]
    with torch.no_grad():
        values = StepModule(model)(x)
    return dict(zip(names, values))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_gaussian_matrix_is_the_reference_filter():
    x = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    a = gaussian_matrix(20)
    torch.testing.assert_close(a @ x @ a.T, gaussian_filter(x))
    torch.testing.assert_close(a.sum(dim=1), torch.ones(20, dtype=torch.float64))


@pytest.mark.parametrize("family,architecture,size", SHAPES)
def test_step_matches_autograd_in_float64(tiny_model, family, architecture, size):
    model = tiny_model(family, size=size, architecture=architecture)
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want, got = _autograd(model, x), _analytic(model, x)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape
        assert _relative_error(got[name], want[name]) < 1e-10, name


@pytest.mark.parametrize("family", FAMILIES)
def test_step_matches_autograd_in_float32_on_real_rgb_images(family):
    from eproj.train.models import ModelConfig, build_model

    torch.manual_seed(1)
    model = build_model(ModelConfig(family=family, size=64, channels=3, latent=16)).eval()
    astronaut = skdata.astronaut()[100:228:2, 150:278:2].astype(np.float32) / 255
    x = torch.from_numpy(np.stack([astronaut, astronaut[::-1].copy()]).transpose(0, 3, 1, 2).copy())
    want, got = _autograd(model, x), _analytic(model, x)
    for name in want:
        assert _relative_error(got[name], want[name]) <= 1e-4, name


@pytest.mark.parametrize("name", ["brick-l2ae", "grass-vae", "grass-unet-puzzle"])
def test_step_matches_autograd_on_the_shipped_models(name):
    from eproj import demo
    from eproj.train.checkpoint import load_model

    model = load_model(demo.MODELS_DIR / f"{name}.pt").model
    texture = getattr(skdata, name.split("-")[0])()[384:512, :256].astype(np.float32) / 255
    x = torch.from_numpy(np.stack([texture[:, :128], texture[:, 128:]])[:, None].copy())
    want, got = _autograd(model, x), _analytic(model, x)
    for key in want:
        assert _relative_error(got[key], want[key]) <= 1e-4, key


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_leaky_relu_derivative_is_exactly_one_or_the_slope(dtype):
    """Against autograd at the edges: zero (either sign), the smallest normal and
    subnormal-adjacent outputs, outputs that overflow when scaled, negatives."""
    layer = torch.nn.LeakyReLU(0.2)
    info = torch.finfo(dtype)
    z = torch.tensor([0.0, -0.0, info.tiny, 2 * info.tiny, 1e-3, 0.5, 1.0, 3.0, info.max, -info.tiny, -1.0,
                      -info.max], dtype=dtype).requires_grad_(True)
    y = layer(z)
    g = torch.linspace(-2, 2, len(z), dtype=dtype)
    expected, = torch.autograd.grad(y, z, g)
    got = _layer_input_grad(layer, g, y.detach(), z.shape)
    if dtype == torch.float16:  # the slope is rounded to float16 before the product: one rounding apart
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=0)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 64])
def test_upsampling_matrix_is_bilinear_with_aligned_corners(n):
    x = torch.rand(2, 3, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    b = upsampling_matrix(n)
    torch.testing.assert_close(b @ x @ b.T, upsample(x), rtol=0, atol=1e-13)  # x in [0, 1]
    torch.testing.assert_close(b.sum(dim=1), torch.ones(2 * n, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_pool_adjoint_routes_ties_as_autograd(dtype):
    """Values drawn from {0, 1, 2} tie in most windows (and all four in some): the gradient of each
    window goes to its first maximum in the order top-left, top-right, bottom-left, bottom-right,
    exactly as autograd's max_pool2d routes it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (4, 3, 16, 16), generator=gen).to(dtype)
    x[0, 0] = 1.0  # every window a four-way tie
    x.requires_grad_(True)
    pooled = torch.nn.functional.max_pool2d(x, 2)
    g = torch.randn(pooled.shape, generator=gen, dtype=dtype)
    want, = torch.autograd.grad(pooled, x, g)
    assert torch.equal(max_pool(x.detach()), pooled.detach())
    assert torch.equal(max_pool_adjoint(x.detach(), pooled.detach(), g), want)
    ties = (x.detach() == torch.nn.functional.interpolate(pooled.detach(), scale_factor=2)).float()
    assert float(torch.nn.functional.avg_pool2d(ties, 2).max()) == 1.0  # the test holds four-way ties


def test_unet_step_matches_autograd_where_pooling_windows_tie(tiny_model):
    """A constant image gives equal positive features inside the first block's windows away from
    the border, so most first-level pooling windows tie; the step still equals autograd."""
    model = tiny_model("unet", size=32)
    x = torch.full((2, 1, 32, 32), 0.5, dtype=torch.float64)
    x[1, :, :16] = 0.25
    features, _ = model.encode(x)
    windows = features[0].unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
    tied = (windows == windows.max(dim=-1, keepdim=True).values).sum(dim=-1) > 1
    assert float((tied & (windows.max(dim=-1).values > 0)).float().mean()) > 0.3
    want, got = _autograd(model, x), _analytic(model, x)
    for name in want:
        assert _relative_error(got[name], want[name]) < 1e-10, name


@pytest.mark.parametrize("family,architecture,size", SHAPES)
def test_forward_module_gives_the_steps_reconstruction_and_loss(tiny_model, family, architecture, size):
    """``gradient=False`` (the forward graph) runs the step's own code up to Lr: the same two
    values, bit for bit, and nothing else."""
    model = tiny_model(family, size=size, architecture=architecture)
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        step = StepModule(model)(x)
        forward = StepModule(model, gradient=False)(x)
    assert len(forward) == 2
    assert torch.equal(forward[0], step[0]) and torch.equal(forward[1], step[1])
