"""Autoencoder architectures and the model families built on them.

Three architectures:

- ``bergmann``: the convolutional autoencoder of Bergmann et al. (2019) for
  128x128 inputs (any multiple of 16 works: the last encoder kernel is size/16).
  Encoder filters 32,32,32,64,64,128,64,32,d with kernels 4,4,3,4,3,4,3,3,8 and
  strides 2,2,1,2,1,2,1,1,1; the decoder mirrors it with transposed
  convolutions; LeakyReLU(0.2); sigmoid output.
- ``zimmerer``: the smaller fully convolutional VAE for 64x64 inputs of Zimmerer
  et al. (feature maps 16-32-64-256, 4x4 stride-2 convolutions, LeakyReLU).
- ``unet``: the standard U-Net without batch norm (Puzzle-AE, Salehi et al.):
  double 3x3 convolution + ReLU blocks of widths w, 2w, 4w, 8w, 8w down to 1/16
  of the input with 2x2 max-pooling, bilinear x2 upsampling (align_corners=True)
  and skip concatenation back up, a 1x1 output convolution and a sigmoid.

Families (the paper's Table 1) on the Bergmann or Zimmerer architecture:

- ``l2ae``: deterministic, L2 loss.
- ``dsae``: deterministic, DSSIM loss.
- ``vae``: encoder gives mu and log sigma^2, Gaussian decoder of fixed variance
  ``decoder_variance``; KL weight ``beta`` (beta = 1 is the VAE, other values
  the beta-VAE).
- ``gvae``: the gamma-VAE of Dai & Wipf, decoder variance gamma^2 learned.

and, on its own architecture:

- ``unet``: the U-Net, deterministic, L2 loss (Lr as for ``l2ae``). It has no
  bottleneck, so it reconstructs anything unless its training forbids copying
  (``--regime corrupt`` or ``puzzle``).

A model maps images in [0, 1] of shape (N, C, H, W) to reconstructions of the
same shape; ``model(x)`` is f(x), the decoder applied to the encoder mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eproj.errors import ConfigError

FAMILIES = ("l2ae", "dsae", "vae", "gvae", "unet")
ARCHITECTURES = ("bergmann", "zimmerer", "unet")
UNET_LEVELS = 5  # feature levels of the U-Net: full resolution down to 1/16

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
    # None: the family's default, "unet" for the unet family and "bergmann" for the others
    architecture: str | None = None
    size: int = 128
    channels: int = 1
    latent: int = 100  # the latent size d of the autoencoders (the U-Net has no latent code)
    beta: float = 1.0
    decoder_variance: float = 0.01  # fixed sigma^2 of the vae family's Gaussian decoder
    width: int = 16  # w, the U-Net's first feature width (the unet family only)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model family must be one of {FAMILIES}, got {self.family!r}")
        if self.architecture is None:
            object.__setattr__(self, "architecture", "unet" if self.family == "unet" else "bergmann")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if (self.family == "unet") != (self.architecture == "unet"):
            raise ConfigError(f"the unet family runs on the unet architecture and only it does; got family "
                              f"{self.family!r} with architecture {self.architecture!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or not 1 <= self.width <= 256:
            raise ConfigError(f"U-Net width must be an integer in [1, 256], got {self.width!r}")
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


def unet_widths(width: int) -> tuple[int, ...]:
    """The U-Net's feature widths per level, full resolution first: w, 2w, 4w, 8w, 8w."""
    return (width, 2 * width, 4 * width, 8 * width, 8 * width)


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


def _double_conv(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(mid_ch, out_ch, 3, padding=1), nn.ReLU())


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling with align_corners=True: (N, C, h, w) -> (N, C, 2h, 2w)."""
    return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=True)


class UNet(nn.Module):
    """The U-Net of the unet family (no batch norm), on images in [0, 1].

    ``down[l]`` (l = 0..4) is the double 3x3 convolution + ReLU block at 1/2^l of the
    input size, widths ``unet_widths(w)``; levels 1..4 first max-pool by 2. ``up[l]``
    (l = 3..0, applied in that order) takes the concatenation [skip features of level
    l, bilinear x2 upsampling of the level below] (2 * widths[l] channels) to
    widths[l - 1] (w at level 0) through a double convolution of middle width
    widths[l]. ``out`` is the 1x1 convolution to C channels and the sigmoid.

    The sigmoid, not a clamp, keeps the output in [0, 1]: a clamp has a zero
    derivative wherever the output leaves the range, which stops both training and
    the projection's input gradient there; the sigmoid is smooth everywhere and is
    the output of every other family.

    ``encode(x)`` returns ``(features, None)``, ``features`` the tuple of the five
    levels' block outputs (the U-Net's code is its whole feature pyramid, there is no
    latent vector); ``decode(features)`` returns (N, C, H, W) in [0, 1];
    ``forward(x) = decode(encode(x)[0])``, the reconstruction f(x).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = unet_widths(config.width)
        ins = (config.channels,) + widths[:-1]
        self.down = nn.ModuleList(_double_conv(i, o, o) for i, o in zip(ins, widths))
        self.up = nn.ModuleList(_double_conv(2 * widths[level], widths[level], widths[max(level - 1, 0)])
                                for level in range(UNET_LEVELS - 1))
        self.out = nn.Sequential(nn.Conv2d(widths[0], config.channels, 1), nn.Sigmoid())
        for module in self.modules():  # He initialisation for ReLU, zero biases
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                assert module.bias is not None
                nn.init.zeros_(module.bias)

    def encode(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], None]:
        features = [self.down[0](x)]
        for level in range(1, UNET_LEVELS):
            features.append(self.down[level](F.max_pool2d(features[-1], 2)))
        return tuple(features), None

    def decode(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h = features[-1]
        for level in range(UNET_LEVELS - 2, -1, -1):
            h = self.up[level](torch.cat([features[level], upsample(h)], dim=1))
        return self.out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])


Model = Autoencoder | UNet


def build_model(config: ModelConfig) -> Model:
    """Build a fresh model for ``config`` (He initialisation, see ``_he_init`` and ``UNet``)."""
    if config.family == "unet":
        return UNet(config)
    return Autoencoder(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

