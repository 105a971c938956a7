"""PIAD's networks (Tuluptceva et al., supplement §1.3, Tables 1 and 4): the encoder E, the
generator G, the image critic D_X and the latent critic D_Z, and the anomaly score of Eq. 1.

All without normalisation, LeakyReLU 0.2, Kaiming-normal init (fan_out, a = 0.2), zero biases;
``n = log2(size / 4)``:

- G: latent (d, 1, 1) -> conv 4x4 (pad 3) -> BlockUp x n -> pre-activation block
  -> LeakyReLU -> conv 1x1 -> image (linear output);
- E: conv 3x3 -> BlockDown x n -> LeakyReLU -> conv 4x4 -> LeakyReLU -> conv 1x1 -> latent d;
- D_X: conv 3x3 -> BlockDown x n -> minibatch stddev -> LeakyReLU -> conv 4x4 -> LeakyReLU -> conv 1x1 -> 1;
- D_Z: dense h -> LeakyReLU -> dense h -> LeakyReLU -> dense 1 (h = 4 d as in Tables 1, 2 and 4).

Images are in [0, 1] outside (eproj's convention) and in [-1, 1] inside the networks
(supplement §1): ``PIAD`` maps at the boundary. Training is ``eproj.train.piad``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from eproj.errors import ConfigError
from eproj.train.perceptual import FeatureStats, relative_perceptual_l1

LEAK = 0.2


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> [-1, 1] (the range PIAD's networks work in)."""
    return x * 2.0 - 1.0


def from_model_range(y: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (not clamped: the generator's output is linear)."""
    return (y + 1.0) * 0.5


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PIADConfig:
    """The networks' shapes. Defaults: the reduced CPU recipe (64x64, widths 32, latent 64);
    the paper's CelebA/LSUN networks (Table 4) are width 64, latent 64."""

    size: int = 64
    channels: int = 3
    width: int = 32
    latent: int = 64
    latent_critic_width: int = 0  # 0: 4 x latent

    def __post_init__(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ConfigError(f"PIAD size must be a power of 2 >= 8, got {self.size}")
        if self.channels not in (1, 3):
            raise ConfigError(f"PIAD channels must be 1 or 3, got {self.channels}")
        for name in ("width", "latent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PIAD {name} must be >= 1, got {getattr(self, name)}")
        if self.latent_critic_width < 0:
            raise ConfigError(f"latent critic width must be >= 0 (0: 4 x latent), got {self.latent_critic_width}")

    @property
    def resamplings(self) -> int:
        """BlockUp / BlockDown count: log2(size / 4)."""
        return int(math.log2(self.size)) - 2

    @property
    def critic_hidden(self) -> int:
        return self.latent_critic_width or 4 * self.latent

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PIADConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown PIAD config fields {unknown}; known: {sorted(known)}")
        return cls(**d)

# --------------------------------------------------------------------------------------
# building blocks (supplement Figure 1)
# --------------------------------------------------------------------------------------

def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAK)


class PreActBlock(nn.Module):
    """Pre-activation residual block without normalisation: two 3x3 convs of ``c_out`` filters,
    LeakyReLU before each; ``resample`` None (Fig. 1a), ``"up"`` (BlockUp, nearest x2 before the
    convs, Fig. 1b) or ``"down"`` (BlockDown, average-pool 2 after them, Fig. 1c). The skip path
    is resampled the same way and gets a 1x1 conv when the width changes."""

    def __init__(self, c_in: int, c_out: int, resample: str | None = None) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _act(x)
        skip = x
        if self.resample == "up":
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            skip = F.interpolate(skip, scale_factor=2, mode="nearest")
        h = self.conv2(_act(self.conv1(h)))
        if self.skip is not None:
            skip = self.skip(skip)
        if self.resample == "down":
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return skip + h


class MinibatchStddev(nn.Module):
    """Minibatch standard deviation (Karras et al.): the std over the batch of every feature at
    every position, averaged to one number and appended as a constant channel: (N, C, H, W) ->
    (N, C + 1, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(x.var(dim=0, unbiased=False) + 1e-8).mean()
        return torch.cat([x, std.expand(x.shape[0], 1, *x.shape[2:])], dim=1)


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal init (fan_out, a = 0.2) of every conv and dense weight, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=LEAK, mode="fan_out", nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------
# the four networks (Tables 1 and 4); all in [-1, 1]
# --------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """E: (N, C, S, S) in [-1, 1] -> (N, latent)."""

    def __init__(self, config: PIADConfig) -> None:
        super().__init__()
        w = config.width
        self.stem = nn.Conv2d(config.channels, w, 3, padding=1)
        self.blocks = nn.Sequential(*[PreActBlock(w, w, "down") for _ in range(config.resamplings)])
        self.conv4 = nn.Conv2d(w, w, 4)
        self.out = nn.Conv2d(w, config.latent, 1)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _act(self.conv4(_act(self.blocks(self.stem(x)))))
        return self.out(h).flatten(1)


class Generator(nn.Module):
    """G: (N, latent) -> (N, C, S, S), linear output (the image range is [-1, 1])."""

    def __init__(self, config: PIADConfig) -> None:
        super().__init__()
        w = config.width
        self.latent = config.latent
        self.stem = nn.Conv2d(config.latent, w, 4, padding=3)
        self.blocks = nn.Sequential(*[PreActBlock(w, w, "up") for _ in range(config.resamplings)],
                                    PreActBlock(w, w))
        self.out = nn.Conv2d(w, config.channels, 1)
        kaiming_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(_act(self.blocks(self.stem(z.view(z.shape[0], self.latent, 1, 1)))))


class ImageCritic(nn.Module):
    """D_X: (N, C, S, S) in [-1, 1] -> (N,)."""

    def __init__(self, config: PIADConfig) -> None:
        super().__init__()
        w = config.width
        self.stem = nn.Conv2d(config.channels, w, 3, padding=1)
        self.blocks = nn.Sequential(*[PreActBlock(w, w, "down") for _ in range(config.resamplings)])
        self.stddev = MinibatchStddev()
        self.conv4 = nn.Conv2d(w + 1, w, 4)
        self.out = nn.Conv2d(w, 1, 1)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _act(self.stddev(self.blocks(self.stem(x))))
        return self.out(_act(self.conv4(h))).flatten()


class LatentCritic(nn.Module):
    """D_Z: (N, latent) -> (N,)."""

    def __init__(self, config: PIADConfig) -> None:
        super().__init__()
        h = config.critic_hidden
        self.layers = nn.Sequential(nn.Linear(config.latent, h), nn.LeakyReLU(LEAK), nn.Linear(h, h),
                                    nn.LeakyReLU(LEAK), nn.Linear(h, 1))
        kaiming_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).flatten()


class PIAD(nn.Module):
    """E and G with eproj's [0, 1] images at the boundary (what evaluation and export use)."""

    def __init__(self, config: PIADConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder, self.generator = Encoder(config), Generator(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) in [0, 1] -> (N, latent)."""
        return self.encoder(to_model_range(x))

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent) -> (N, C, S, S), about [0, 1] (not clamped)."""
        return from_model_range(self.generator(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)): (N, C, S, S) in [0, 1] -> the same shape, about [0, 1]."""
        return self.generate(self.encode(x))


class Critics(nn.Module):
    """D_X and D_Z (one Adam optimises both: Adam is per parameter)."""

    def __init__(self, config: PIADConfig) -> None:
        super().__init__()
        self.image, self.latent = ImageCritic(config), LatentCritic(config)


def anomaly_score(model: PIAD, feature_network: nn.Module, stats: FeatureStats, x: torch.Tensor) -> torch.Tensor:
    """A(x) = L_rel-perc-L1(x, G(E(x))) (Eq. 1): x (N, C, S, S) in [0, 1] -> (N,)."""
    return relative_perceptual_l1(feature_network, stats, x, model.reconstruct(x))
