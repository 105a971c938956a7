import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import structural_similarity

from eproj.train.losses import (dssim_map, gaussian_taps, kl_divergence, l2_map, reconstruction_loss,
                                training_loss)

FAMILIES = ("l2ae", "dsae", "vae", "gvae")


def _skimage_dssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W) DSSIM from scikit-image's full SSIM map, channel mean."""
    _, full = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, full=True, channel_axis=2)
    return ((1.0 - full) / 2.0).mean(axis=2)


def _torch_dssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ta = torch.from_numpy(a.transpose(2, 0, 1)[None].copy())
    tb = torch.from_numpy(b.transpose(2, 0, 1)[None].copy())
    return dssim_map(ta, tb)[0].numpy()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(40, 40), (37, 53)])
def test_dssim_matches_skimage_on_random_images(channels, shape):
    rng = np.random.default_rng(1)
    a = rng.random((*shape, channels))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    np.testing.assert_allclose(_torch_dssim(a, b), _skimage_dssim(a, b), atol=1e-4)


def test_dssim_matches_skimage_on_real_textures_in_float32():
    a = skdata.brick()[:128, :160].astype(np.float32)[:, :, None] / 255
    b = skdata.grass()[:128, :160].astype(np.float32)[:, :, None] / 255
    ours = _torch_dssim(a, b)
    np.testing.assert_allclose(ours, _skimage_dssim(a.astype(np.float64), b.astype(np.float64)), atol=1e-4)
    assert ours.dtype == np.float32


def test_dssim_of_identical_images_is_zero_and_bounded():
    x = torch.rand(2, 1, 32, 32)
    assert dssim_map(x, x).abs().max() < 1e-6
    d = dssim_map(x, 1 - x)
    assert d.min() >= 0 and d.max() <= 1
    assert dssim_map(x, 1 - x).mean() > 0.3


def test_gaussian_taps():
    taps = gaussian_taps(11, 1.5)
    assert taps.shape == (11,) and abs(float(taps.sum()) - 1) < 1e-12
    assert torch.allclose(taps, taps.flip(0))
    with pytest.raises(ValueError):
        gaussian_taps(10)


def test_l2_map():
    x = torch.zeros(1, 3, 4, 4)
    y = torch.zeros(1, 3, 4, 4)
    y[0, 0, 1, 2] = 0.6
    m = l2_map(x, y)
    assert m.shape == (1, 4, 4)
    assert m[0, 1, 2] == pytest.approx(0.36 / 3)


def test_kl_against_torch_distributions():
    mu = torch.randn(3, 5, 1, 1, dtype=torch.float64)
    logvar = torch.randn(3, 5, 1, 1, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_loss_matches_its_definition(tiny_model, family):
    model = tiny_model(family)
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    loss, rec = reconstruction_loss(model, x)
    mu, _ = model.encode(x)
    torch.testing.assert_close(rec, model.decode(mu))
    sq = ((x - rec) ** 2).flatten(1).sum(1)
    if family in ("l2ae", "vae"):
        expected = sq
    elif family == "dsae":
        expected = dssim_map(x, rec).flatten(1).sum(1)
    else:
        gamma = model.log_gamma.exp()
        expected = sq / (2 * gamma ** 2) + x[0].numel() * torch.log(gamma)
    torch.testing.assert_close(loss, expected)
    assert loss.shape == (3,)


def test_vae_training_loss_is_gaussian_nll_plus_beta_kl(tiny_model):
    model = tiny_model("vae")
    x = torch.rand(4, 1, 32, 32, dtype=torch.float64)
    torch.manual_seed(3)
    loss, logs = training_loss(model, x, kl_scale=0.5)
    torch.manual_seed(3)
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    rec = ((x - model.decode(z)) ** 2).flatten(1).sum(1) / (2 * model.config.decoder_variance)
    expected = (rec + 0.5 * model.config.beta * kl_divergence(mu, logvar)).mean()
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"rec", "kl"}


def test_deterministic_training_loss_is_mean_lr(tiny_model):
    model = tiny_model("dsae")
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    loss, _ = training_loss(model, x)
    torch.testing.assert_close(loss, reconstruction_loss(model, x)[0].mean())
