"""Losses of the model families and their reconstruction terms Lr.

The reference definitions every faster path is tested against:

- ``dssim_map``: DSSIM = (1 - SSIM) / 2 per pixel with an 11x11 Gaussian window
  (sigma 1.5, K1 = 0.01, K2 = 0.03), population covariances and symmetric
  ("half-sample") border padding, so that it equals scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, full=True)`` map.
- ``reconstruction_loss``: Lr(x) per sample, the family's reconstruction term
  evaluated at the encoder mean (sums over pixels, not means, so that the
  projection step size alpha is the paper's). For the Gaussian decoders of
  fixed variance (l2ae, vae) Lr is the sum of squared residuals: the negative
  log-likelihood without its constant factor 1/(2 sigma^2), so that one step
  size fits every family.
- ``training_loss``: what Adam minimises while training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from eproj.train.models import Autoencoder

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def gaussian_taps(window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, shape (window,), float64, on ``device``."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 1, got {window}")
    r = window // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    return taps / taps.sum()


def _symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the last two dims by r with edge-including mirroring (d c b a | a b c d)."""
    if r == 0:
        return x
    if x.shape[-1] < r or x.shape[-2] < r:
        raise ValueError(f"image of size {tuple(x.shape[-2:])} is smaller than the window radius {r}")
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)


def gaussian_filter(x: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Separable Gaussian filter of (N, C, H, W) with symmetric borders; same shape out."""
    taps = gaussian_taps(window, sigma, x.device).to(x.dtype)
    c = x.shape[1]
    r = window // 2
    xp = _symmetric_pad(x, r)
    kh = taps.view(1, 1, 1, window).expand(c, 1, 1, window)
    kv = taps.view(1, 1, window, 1).expand(c, 1, window, 1)
    return F.conv2d(F.conv2d(xp, kh, groups=c), kv, groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
             window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of two (N, C, H, W) batches; (N, C, H, W) out."""
    if x.shape != y.shape:
        raise ValueError(f"ssim_map needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    n = x.shape[0]
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    ux, uy, uxx, uyy, uxy = gaussian_filter(stacked, window, sigma).split(n, dim=0)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def dssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
              window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """DSSIM = (1 - SSIM) / 2 per pixel, averaged over channels.

    Args:
        x, y: (N, C, H, W) float tensors in [0, data_range].
    Returns:
        (N, H, W) tensor, values in [0, 1] (0 where the images agree).
    """
    return ((1.0 - ssim_map(x, y, data_range, window, sigma)) / 2.0).mean(dim=1)


def l2_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared residual per pixel, averaged over channels: (N, C, H, W) -> (N, H, W)."""
    return ((x - y) ** 2).mean(dim=1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample: (N, d, 1, 1) -> (N,)."""
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(dim=1)


def reconstruction_term(model: Autoencoder, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """The family's reconstruction term of x given its reconstruction, per sample (N,).

    - l2ae, vae: sum of squared residuals (a Gaussian decoder of fixed variance 1/2);
    - dsae: sum of the DSSIM map;
    - gvae: Gaussian negative log-likelihood with learned std gamma,
      ||x - f||^2 / (2 gamma^2) + D log gamma (the constant D/2 log 2 pi dropped).
    """
    family = model.config.family
    if family == "dsae":
        return _per_sample_sum(dssim_map(x, reconstruction))
    sq = _per_sample_sum((x - reconstruction) ** 2)
    if family == "gvae":
        dims = x[0].numel()
        return sq / (2.0 * torch.exp(2.0 * model.log_gamma)) + dims * model.log_gamma
    return sq


def reconstruction_loss(model: Autoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lr(x) per sample at the encoder mean, with the reconstruction f(x).

    Args:
        x: (N, C, H, W) float tensor in [0, 1].
    Returns:
        (loss (N,), reconstruction (N, C, H, W)).
    """
    reconstruction = model(x)
    return reconstruction_term(model, x, reconstruction), reconstruction


def training_loss(model: Autoencoder, x: torch.Tensor, kl_scale: float = 1.0,
                  target: torch.Tensor | None = None, with_kl: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss (mean over the batch) that training minimises, and values to log.

    ``kl_scale`` multiplies the KL term of the variational families (the trainer
    ramps it from 0 to 1 during the KL warm-up, against posterior collapse).
    ``target``: the image the reconstruction of ``x`` is scored against (default
    ``x``; the clean image when ``x`` is corrupted). ``with_kl=False`` drops the KL
    term (the context-encoding branch of the ceVAE).
    """
    cfg = model.config
    target = x if target is None else target
    mu, logvar = model.encode(x)
    if not cfg.variational:
        rec = reconstruction_term(model, target, model.decode(mu))
        return rec.mean(), {"rec": float(rec.detach().mean())}
    assert logvar is not None
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    rec = reconstruction_term(model, target, model.decode(z))
    if cfg.family == "vae":  # Gaussian negative log-likelihood of fixed variance, constants dropped
        rec = rec / (2.0 * cfg.decoder_variance)
    logs = {"rec": float(rec.detach().mean())}
    if not with_kl:
        return rec.mean(), logs
    kl = kl_divergence(mu, logvar)
    weight = kl_scale * (cfg.beta if cfg.family == "vae" else 1.0)
    loss = (rec + weight * kl).mean()
    logs["kl"] = float(kl.detach().mean())
    if cfg.family == "gvae":
        logs["gamma"] = math.exp(float(model.log_gamma.detach()))
    return loss, logs
