"""The reference ingredients of the pixel-wise predictors, by autograd
(see eproj.predictors for the maps)."""

from __future__ import annotations

import torch

from eproj.predictors import Ingredients, loss_weights
from eproj.train.losses import kl_divergence, reconstruction_term
from eproj.train.models import Autoencoder
from eproj.train.projection import ProjectionConfig, project


def reference_ingredients(model: Autoencoder, x0: torch.Tensor, projection: ProjectionConfig | None = None) -> Ingredients:
    """Ingredients of a batch (N, C, H, W) by autograd; the projection only when a config is given."""
    cfg = model.config
    x = x0.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        mu, logvar = model.encode(x)
        reconstruction = model.decode(mu)
        rec = reconstruction_term(model, x, reconstruction)
        rec_grad, = torch.autograd.grad(rec.sum(), x, retain_graph=cfg.variational)
        kl_grad = None
        if cfg.variational:
            kl_grad, = torch.autograd.grad(kl_divergence(mu, logvar).sum(), x)
    w_rec, w_kl = loss_weights(cfg.family, cfg.beta, cfg.decoder_variance)
    projected = None
    if projection is not None:
        projected = project(model, x0, projection).projection.detach().numpy()
    return Ingredients(x0=x0.detach().numpy(), reconstruction=reconstruction.detach().numpy(),
                       rec_grad=rec_grad.numpy(), kl_grad=None if kl_grad is None else kl_grad.numpy(),
                       projection=projected, rec_weight=w_rec, kl_weight=w_kl)


