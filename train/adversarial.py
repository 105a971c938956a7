"""The optional adversarial term of Puzzle-AE (Salehi et al., Eqs. 3-4).

A DCGAN discriminator D judges whether an image is a training image x or a
restoration U(x~) of its puzzle. Its penultimate features f_D give the
feature-matching loss the U-Net adds to its reconstruction loss:

    L_adv = || f_D(x) - f_D(U(x~)) ||^2   (per sample: the sum over features, then the batch mean)
    L = L_rec + lambda * L_adv            (lambda = ``TrainConfig.adv_weight``; the paper's 0.02)

f_D(x) is the target (no gradient flows through it) and L moves the U-Net only.
D itself is trained with the DCGAN binary cross-entropy (x real, U(x~) fake) by
its own Adam (lr 2e-4, beta1 0.5, as in DCGAN and the paper).

The discriminator: 4x4 stride-2 convolutions halving the image down to 4x4
(widths ``DISCRIMINATOR_WIDTH`` doubling per layer, at most 8x), LeakyReLU(0.2)
after each, batch norm on every convolution after the first (DCGAN's
discriminator), then one 4x4 convolution to a single logit. f_D is the output of
the last LeakyReLU: (N, width * 2^(L-1), 4, 4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DISCRIMINATOR_WIDTH = 16  # the first layer's filters (DCGAN uses 64; 16 keeps the CPU cost small)
DISCRIMINATOR_LR = 2e-4
DISCRIMINATOR_BETAS = (0.5, 0.999)
PAPER_ADV_WEIGHT = 0.02


class Discriminator(nn.Module):
    """DCGAN discriminator for (N, C, S, S) images in [0, 1], S a power of two >= 8.

    ``features(x)`` is f_D(x), (N, F, 4, 4); ``forward(x)`` the logit (N,).
    """

    def __init__(self, channels: int, size: int, width: int = DISCRIMINATOR_WIDTH) -> None:
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"the discriminator needs a power-of-two image size >= 8, got {size}")
        layers: list[nn.Module] = []
        in_ch, out_ch, side = channels, width, size
        while side > 4:
            layers.append(nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=not layers))
            if layers[:-1]:  # batch norm on every convolution but the first
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.LeakyReLU(0.2))
            in_ch, out_ch, side = out_ch, min(2 * out_ch, 8 * width), side // 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(in_ch, 1, 4, 1, 0)
        for module in self.modules():  # DCGAN's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten()


def feature_matching_loss(discriminator: Discriminator, real: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """L_adv of Eq. 3: the batch mean of ||f_D(real) - f_D(restored)||^2 (squared L2 over all
    features of a sample); f_D(real) is detached, so the gradient reaches ``restored`` only."""
    with torch.no_grad():
        target = discriminator.features(real)
    return ((discriminator.features(restored) - target) ** 2).flatten(1).sum(dim=1).mean()


def discriminator_loss(discriminator: Discriminator, real: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """DCGAN's loss of D: BCE(D(real), 1) + BCE(D(restored), 0), ``restored`` detached."""
    real_logit = discriminator(real)
    fake_logit = discriminator(restored.detach())
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


class Adversary:
    """The discriminator and its optimizer, as one training run holds them."""

    def __init__(self, channels: int, size: int, width: int = DISCRIMINATOR_WIDTH) -> None:
        self.discriminator = Discriminator(channels, size, width)
        self.discriminator.train()
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=DISCRIMINATOR_LR,
                                          betas=DISCRIMINATOR_BETAS)

    def generator_term(self, real: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """L_adv for the U-Net's loss (D's weights get no gradient from it)."""
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        try:
            return feature_matching_loss(self.discriminator, real, restored)
        finally:
            for p in self.discriminator.parameters():
                p.requires_grad_(True)

    def step(self, real: torch.Tensor, restored: torch.Tensor) -> float:
        """One Adam step of D on a batch; returns its loss."""
        loss = discriminator_loss(self.discriminator, real, restored)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        return {"model": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "width": DISCRIMINATOR_WIDTH}

    @classmethod
    def from_state(cls, state: dict[str, Any], channels: int, size: int) -> "Adversary":
        adversary = cls(channels, size, int(state.get("width", DISCRIMINATOR_WIDTH)))
        adversary.discriminator.load_state_dict(state["model"])
        adversary.optimizer.load_state_dict(state["optimizer"])
        return adversary


def adversarial_record(weight: float) -> dict[str, Any]:
    """What a checkpoint's train record stores about the adversarial term."""
    return {"weight": float(weight), "discriminator": f"DCGAN, width {DISCRIMINATOR_WIDTH}, 4x4 stride-2 convs, "
            f"LeakyReLU 0.2, batch norm after the first", "loss": "feature matching on f_D, squared L2 per sample",
            "discriminator_adam": {"lr": DISCRIMINATOR_LR, "betas": list(DISCRIMINATOR_BETAS)}}
