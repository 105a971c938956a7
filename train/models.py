"""Autoencoder architectures and the model families built on them.

Two architectures:

- ``bergmann``: the convolutional autoencoder of Bergmann et al. (2019) for
  128x128 inputs (any multiple of 16 works: the last encoder kernel is size/16).
  Encoder filters 32,32,32,64,64,128,64,32,d with kernels 4,4,3,4,3,4,3,3,8 and
  strides 2,2,1,2,1,2,1,1,1; the decoder mirrors it with transposed
  convolutions; LeakyReLU(0.2); sigmoid output.
- ``zimmerer``: the smaller fully convolutional VAE for 64x64 inputs of Zimmerer
  et al. (feature maps 16-32-64-256, 4x4 stride-2 convolutions, LeakyReLU).

Families (the paper's Table 1), all on the same architecture:

- ``l2ae``: deterministic, L2 loss.
- ``dsae``: deterministic, DSSIM loss.
- ``vae``: encoder gives mu and log sigma^2, Gaussian decoder of fixed variance
  ``decoder_variance``; KL weight ``beta`` (beta = 1 is the VAE, other values
  the beta-VAE).
- ``gvae``: the gamma-VAE of Dai & Wipf, decoder variance gamma^2 learned.

A model maps images in [0, 1] of shape (N, C, H, W) to reconstructions of the
same shape; ``model(x)`` is f(x), the decoder applied to the encoder mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from eproj.errors import ConfigError

FAMILIES = ("l2ae", "dsae", "vae", "gvae")
ARCHITECTURES = ("bergmann", "zimmerer")

# (out_channels, kernel, stride) of the Bergmann encoder; the last entry's
# channel count is the latent size d and its kernel is size // 16.
_BERGMANN_ENCODER = ((32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1),
                     (128, 4, 2), (64, 3, 1), (32, 3, 1))
_ZIMMERER_FEATURES = (16, 32, 64, 256)
LOGVAR_INIT = -6.0  # initial bias of the encoder's log sigma^2 outputs


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in checkpoints as plain values."""

    family: str = "l2ae"
    architecture: str = "bergmann"
    size: int = 128
    channels: int = 1
    latent: int = 100
    beta: float = 1.0
    decoder_variance: float = 0.01  # fixed sigma^2 of the vae family's Gaussian decoder

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model family must be one of {FAMILIES}, got {self.family!r}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.size < 16 or self.size % 16:
            raise ConfigError(f"input size must be a multiple of 16 and >= 16, got {self.size}")
        if self.latent < 1:
            raise ConfigError(f"latent size must be >= 1, got {self.latent}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.decoder_variance <= 0:
            raise ConfigError(f"decoder variance must be > 0, got {self.decoder_variance}")

    @property
    def variational(self) -> bool:
        return self.family in ("vae", "gvae")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**values)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def _bergmann(config: ModelConfig, latent_out: int) -> tuple[nn.Sequential, nn.Sequential]:
    c, d, last_kernel = config.channels, config.latent, config.size // 16
    enc: list[nn.Module] = []
    in_ch = c
    for out_ch, k, s in _BERGMANN_ENCODER:
        enc += [nn.Conv2d(in_ch, out_ch, k, s, padding=1), _act()]
        in_ch = out_ch
    enc.append(nn.Conv2d(in_ch, latent_out, last_kernel, 1, padding=0))

    dec: list[nn.Module] = [nn.ConvTranspose2d(d, in_ch, last_kernel, 1, padding=0), _act()]
    mirrored = list(reversed(_BERGMANN_ENCODER))
    outs = [spec[0] for spec in mirrored[1:]] + [c]
    for (_, k, s), out_ch in zip(mirrored, outs):
        dec.append(nn.ConvTranspose2d(in_ch, out_ch, k, s, padding=1))
        dec.append(_act())
        in_ch = out_ch
    dec[-1] = nn.Sigmoid()
    return nn.Sequential(*enc), nn.Sequential(*dec)


def _zimmerer(config: ModelConfig, latent_out: int) -> tuple[nn.Sequential, nn.Sequential]:
    c, d, last_kernel = config.channels, config.latent, config.size // 16
    enc: list[nn.Module] = []
    in_ch = c
    for out_ch in _ZIMMERER_FEATURES:
        enc += [nn.Conv2d(in_ch, out_ch, 4, 2, padding=1), _act()]
        in_ch = out_ch
    enc.append(nn.Conv2d(in_ch, latent_out, last_kernel, 1, padding=0))
    dec: list[nn.Module] = [nn.ConvTranspose2d(d, in_ch, last_kernel, 1, padding=0), _act()]
    for out_ch in list(reversed(_ZIMMERER_FEATURES))[1:] + [c]:
        dec += [nn.ConvTranspose2d(in_ch, out_ch, 4, 2, padding=1), _act()]
        in_ch = out_ch
    dec[-1] = nn.Sigmoid()
    return nn.Sequential(*enc), nn.Sequential(*dec)


def _he_init(model: nn.Module) -> None:
    """He initialisation for LeakyReLU(0.2), zero biases.

    PyTorch's default initialisation shrinks the signal through the nine layers
    down to the 1x1 bottleneck, so a fresh model outputs a near-constant image
    and training sits on that mean-image plateau for thousands of steps (and
    the VAEs collapse there). Transposed convolutions use their true fan-in,
    in_channels * k^2 / stride^2.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=0.2, mode="fan_in", nonlinearity="leaky_relu")
        elif isinstance(module, nn.ConvTranspose2d):
            # torch's "fan_out" of a transposed convolution's weight is in_channels * k^2
            nn.init.kaiming_normal_(module.weight, a=0.2, mode="fan_out", nonlinearity="leaky_relu")
            with torch.no_grad():
                module.weight.mul_(module.stride[0])
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Autoencoder(nn.Module):
    """An autoencoder of any family.

    ``encode(x)`` returns ``(mu, logvar)`` with shapes (N, d, 1, 1) (``logvar`` is
    None for deterministic families); ``decode(z)`` returns (N, C, H, W) in
    [0, 1]; ``forward(x)`` is the reconstruction f(x) = decode(mu(x)).
    The gamma-VAE also holds ``log_gamma``, the log of the decoder standard deviation.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        latent_out = config.latent * (2 if config.variational else 1)
        build = _bergmann if config.architecture == "bergmann" else _zimmerer
        self.encoder, self.decoder = build(config, latent_out)
        _he_init(self)
        if config.variational:
            # Start with a narrow posterior (std ~0.05): with log sigma^2 near 0 the
            # sampled z is mostly noise and the decoder learns to ignore it
            # (posterior collapse) before the encoder becomes informative.
            last = self.encoder[-1]
            assert isinstance(last, nn.Conv2d) and last.bias is not None
            with torch.no_grad():
                last.bias[config.latent:].fill_(LOGVAR_INIT)
        if config.family == "gvae":
            self.log_gamma = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.encoder(x)
        if not self.config.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])


def build_model(config: ModelConfig) -> Autoencoder:
    """Build a fresh model for ``config`` (He initialisation, see ``_he_init``)."""
    return Autoencoder(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

