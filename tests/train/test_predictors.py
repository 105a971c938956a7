"""The pixel-wise predictors: each against a direct implementation on a small
model, the runtime's (step graph) against the reference's (autograd), and the
ensemble against scikit-learn."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from eproj.errors import ConfigError
from eproj.predictors import PREDICTORS, Ingredients, PredictorConfig, ensemble_map, loss_weights, predictor_maps
from eproj.train.losses import kl_divergence, reconstruction_loss
from eproj.train.predictors import reference_ingredients
from eproj.train.projection import ProjectionConfig, project


def _loss(model, x):
    """The VAE's loss at the encoder mean, w_rec Lr + w_kl KL, per sample."""
    cfg = model.config
    w_rec, w_kl = loss_weights(cfg.family, cfg.beta, cfg.decoder_variance)
    mu, logvar = model.encode(x)
    return w_rec * reconstruction_loss(model, x)[0] + w_kl * kl_divergence(mu, logvar), w_rec, w_kl


@pytest.mark.parametrize("family", ["vae", "gvae"])
def test_each_predictor_against_a_direct_implementation(tiny_model, family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 32, 32, generator=g, dtype=torch.float64)
    config = ProjectionConfig(alpha=0.01, max_iters=3)
    raw = PredictorConfig(grad_sigma=0.0, combi_sigma=2.0)
    maps = predictor_maps(reference_ingredients(model, x0, config), PREDICTORS, raw)
    with torch.no_grad():
        recon = model.decode(model.encode(x0)[0])
        np.testing.assert_allclose(maps["rec_error"], ((x0 - recon) ** 2).mean(1).numpy(), rtol=1e-6)
        projection = project(model, x0, config).projection
        np.testing.assert_allclose(maps["proj_rec_error"], ((x0 - projection) ** 2).mean(1).numpy(), rtol=1e-6)
    # gradients: central differences of the loss at a few pixels
    eps = 1e-6
    for _ in range(5):
        n, i, j = (int(torch.randint(0, s, (1,), generator=g)) for s in (2, 32, 32))
        xp, xm = x0.clone(), x0.clone()
        xp[n, 0, i, j] += eps
        xm[n, 0, i, j] -= eps
        with torch.no_grad():
            total = (_loss(model, xp)[0][n] - _loss(model, xm)[0][n]) / (2 * eps)
            w_rec, w_kl = _loss(model, x0)[1:]
            mu_p, lv_p = model.encode(xp)
            mu_m, lv_m = model.encode(xm)
            kl = w_kl * (kl_divergence(mu_p, lv_p)[n] - kl_divergence(mu_m, lv_m)[n]) / (2 * eps)
        assert maps["elbo_grad"][n, i, j] == pytest.approx(abs(float(total)), rel=1e-4, abs=1e-8)
        assert maps["kl_grad"][n, i, j] == pytest.approx(abs(float(kl)), rel=1e-4, abs=1e-8)
        assert maps["rec_grad"][n, i, j] == pytest.approx(abs(float(total - kl)), rel=1e-4, abs=1e-8)
    smoothed = np.stack([cv2.GaussianBlur(m, (0, 0), 2.0, borderType=cv2.BORDER_REFLECT) for m in maps["kl_grad"]])
    expected = smoothed / smoothed.reshape(2, -1).max(1)[:, None, None] * maps["rec_error"]
    np.testing.assert_allclose(maps["combi"], expected, rtol=1e-5)


def test_predictors_of_a_plain_autoencoder(tiny_model):
    model = tiny_model("l2ae")
    ingredients = reference_ingredients(model, torch.rand(1, 1, 32, 32, dtype=torch.float64))
    assert set(predictor_maps(ingredients, ("rec_error",))) == {"rec_error"}
    with pytest.raises(ConfigError, match=r"need a variational family"):
        predictor_maps(ingredients, ("kl_grad",))
    with pytest.raises(ConfigError, match="proj_rec_error needs the projection"):
        predictor_maps(ingredients, ("proj_rec_error",))
    with pytest.raises(ConfigError, match="unknown predictor"):
        predictor_maps(ingredients, ("gradcam",))


@pytest.mark.parametrize("family", ["vae", "gvae"])
def test_runtime_ingredients_match_the_reference(bundles, family):
    from eproj.runtime.predictors import StepIngredients

    trained, folder = bundles[family]
    x0 = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    runtime = predictor_maps(StepIngredients(folder, max_iters=5)(x0, with_projection=True))
    config = ProjectionConfig(**{**trained.calibration["projection"], "stop_threshold": trained.stop_threshold,
                                 "max_iters": 5})
    reference = predictor_maps(reference_ingredients(trained.model, torch.from_numpy(x0), config))
    for name in PREDICTORS:
        scale = max(float(np.abs(reference[name]).max()), 1e-12)
        assert float(np.abs(runtime[name] - reference[name]).max()) / scale < 1e-3, name


def test_the_ensemble_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    from eproj.train.ensemble import fit_ensemble, labelled_split

    rng = np.random.default_rng(0)
    truth = rng.random((4, 16, 16)) < 0.2
    maps = {"a": (truth + rng.normal(0, 0.7, truth.shape)).astype(np.float32),
            "b": (2 * truth + rng.normal(0, 1.5, truth.shape)).astype(np.float32)}
    model = fit_ensemble(maps, truth, ("a", "b"))
    x = np.stack([maps["a"].ravel(), maps["b"].ravel()], 1).astype(np.float64)
    z = (x - x.mean(0)) / x.std(0)
    expected = LogisticRegression(max_iter=1000).fit(z, truth.ravel()).predict_proba(z)[:, 1]
    np.testing.assert_allclose(ensemble_map(maps, model).ravel(), expected, atol=1e-5)
    fit, rest = labelled_split(48)
    assert len(fit) == 5 and len(rest) == 43 and not set(fit) & set(rest)


def test_ingredients_dataclass_is_what_predictor_maps_reads():
    x = np.zeros((1, 1, 8, 8), np.float32)
    maps = predictor_maps(Ingredients(x, x, x, x, x, 1.0, 1.0))
    assert all(m.shape == (1, 8, 8) for m in maps.values())
