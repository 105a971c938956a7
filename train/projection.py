"""The reference projection: gradient descent on the energy in input space.

For a test batch x0 the energy of a candidate x is

    E(x) = Lr(x) + lam * ||x - x0||_1                       (per sample)

with Lr the family's reconstruction term at the encoder mean
(``eproj.train.losses.reconstruction_loss``). Each iteration forms
grad E = grad_x Lr + lam * sign(x - x0), weights it

- ``hadamard``: by (x - f(x))^2, the paper's default, which moves the pixels
  the model reconstructs badly and leaves the well-explained ones in place;
- ``mask``: by a known mask Omega (1 where pixels may change: inpainting);
- ``none``: not at all,

and takes a ``plain`` step x <- x - alpha * g or an ``adam`` step on g, then
clamps to the value range. Each sample stops on its own, when Lr falls to the
stop threshold (the training-set minimum by default), when its energy stops
changing, or at the iteration cap; a stopped sample no longer changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch

from eproj.errors import ConfigError
from eproj.train.losses import reconstruction_loss
from eproj.train.models import Autoencoder

WEIGHTINGS = ("hadamard", "mask", "none")
STEPS = ("plain", "adam")
STOP_REASONS = ("threshold", "converged", "max_iters")


@dataclass(frozen=True)
class ProjectionConfig:
    """Parameters of the projection; the defaults are the paper's.

    ``energy_tol``: a sample stops when |E_prev - E| <= energy_tol * |E_prev|
    (0 disables). ``stop_threshold``: a sample stops when Lr <= it (None disables).
    """

    alpha: float = 0.5
    lam: float = 0.05
    weighting: str = "hadamard"
    step: str = "plain"
    max_iters: int = 100
    energy_tol: float = 0.0
    stop_threshold: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    value_min: float = 0.0
    value_max: float = 1.0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.step not in STEPS:
            raise ConfigError(f"step must be one of {STEPS}, got {self.step!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")
        if self.max_iters < 0:
            raise ConfigError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.energy_tol < 0:
            raise ConfigError(f"energy_tol must be >= 0, got {self.energy_tol}")
        if not self.value_min < self.value_max:
            raise ConfigError(f"value range must satisfy min < max, got [{self.value_min}, {self.value_max}]")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "ProjectionConfig":
        return replace(self, **changes)


@dataclass
class ProjectionResult:
    """``projection`` (N, C, H, W); ``iterations`` (N,) int64 updates applied;
    ``loss`` and ``energy`` (N,) at the projection; ``stop_reason`` per sample."""

    projection: torch.Tensor
    iterations: torch.Tensor
    loss: torch.Tensor
    energy: torch.Tensor
    stop_reason: list[str]


def energy_terms(model: Autoencoder, x: torch.Tensor, x0: torch.Tensor, lam: float):
    """E, Lr, f(x) and grad_x E for a batch.

    Args:
        x, x0: (N, C, H, W) float tensors; x is the candidate, x0 the observed image.
    Returns:
        energy (N,), loss (N,), reconstruction (N, C, H, W), grad (N, C, H, W), all detached.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        loss, reconstruction = reconstruction_loss(model, xg)
        grad_lr, = torch.autograd.grad(loss.sum(), xg)
    diff = x.detach() - x0
    energy = loss.detach() + lam * diff.abs().flatten(1).sum(dim=1)
    grad = grad_lr + lam * torch.sign(diff)
    return energy, loss.detach(), reconstruction.detach(), grad


@contextmanager
def _frozen(model: Autoencoder) -> Iterator[None]:
    """Parameters need no gradient while projecting (saves the weight-gradient work)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def project(model: Autoencoder, x0: torch.Tensor, config: ProjectionConfig = ProjectionConfig(),
            mask: torch.Tensor | None = None) -> ProjectionResult:
    """Project a batch onto the model's normal manifold.

    Args:
        model: a trained autoencoder (put in eval mode by the caller).
        x0: (N, C, H, W) float32 images in [value_min, value_max].
        config: step parameters and stop criteria.
        mask: for ``weighting="mask"``, Omega of shape (N, 1 or C, H, W), 1 where
            pixels may change and 0 where they are known; required there, refused otherwise.
    Returns:
        a ProjectionResult.
    """
    if x0.ndim != 4:
        raise ConfigError(f"x0 must be (N, C, H, W), got shape {tuple(x0.shape)}")
    if (mask is None) != (config.weighting != "mask"):
        raise ConfigError("a mask is needed exactly when weighting='mask' "
                          f"(weighting={config.weighting!r}, mask {'given' if mask is not None else 'missing'})")
    if mask is not None:
        if mask.ndim != 4 or mask.shape[0] != x0.shape[0] or mask.shape[2:] != x0.shape[2:] \
                or mask.shape[1] not in (1, x0.shape[1]):
            raise ConfigError(f"mask must be (N, 1 or C, H, W) = ({x0.shape[0]}, 1|{x0.shape[1]}, "
                              f"{x0.shape[2]}, {x0.shape[3]}), got {tuple(mask.shape)}")
        mask = mask.to(x0.dtype)
    n = x0.shape[0]
    x0 = x0.detach()
    x = x0.clone()
    active = torch.ones(n, dtype=torch.bool)
    iterations = torch.zeros(n, dtype=torch.int64)
    reasons = ["max_iters"] * n
    previous = torch.full((n,), float("inf"), dtype=x0.dtype)
    m = torch.zeros_like(x0) if config.step == "adam" else None
    v = torch.zeros_like(x0) if config.step == "adam" else None
    with _frozen(model):
        for t in range(config.max_iters + 1):
            energy, loss, reconstruction, grad = energy_terms(model, x, x0, config.lam)
            if t == 0:
                final_energy, final_loss = energy.clone(), loss.clone()
            final_energy = torch.where(active, energy, final_energy)
            final_loss = torch.where(active, loss, final_loss)
            done = torch.zeros(n, dtype=torch.bool)
            if config.stop_threshold is not None:
                hit = active & (loss <= config.stop_threshold)
                for i in torch.nonzero(hit).flatten().tolist():
                    reasons[i] = "threshold"
                done |= hit
            if config.energy_tol > 0 and t > 0:
                flat = active & ~done & ((previous - energy).abs() <= config.energy_tol * previous.abs())
                for i in torch.nonzero(flat).flatten().tolist():
                    reasons[i] = "converged"
                done |= flat
            active &= ~done
            if t == config.max_iters or not bool(active.any()):
                break
            previous = energy
            if config.weighting == "hadamard":
                g = grad * (x - reconstruction) ** 2
            elif config.weighting == "mask":
                g = grad * mask
            else:
                g = grad
            if config.step == "adam":
                count = (iterations + 1).to(x0.dtype).view(n, 1, 1, 1)
                a = active.view(n, 1, 1, 1)
                m = torch.where(a, config.adam_beta1 * m + (1 - config.adam_beta1) * g, m)
                v = torch.where(a, config.adam_beta2 * v + (1 - config.adam_beta2) * g * g, v)
                m_hat = m / (1 - config.adam_beta1 ** count)
                v_hat = v / (1 - config.adam_beta2 ** count)
                stepped = x - config.alpha * m_hat / (v_hat.sqrt() + config.adam_eps)
            else:
                stepped = x - config.alpha * g
            stepped = stepped.clamp(config.value_min, config.value_max)
            x = torch.where(active.view(n, 1, 1, 1), stepped, x)
            iterations += active.to(torch.int64)
    return ProjectionResult(x, iterations, final_loss, final_energy, reasons)
