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
stop threshold (the model's calibrated one by default), when its energy stops
changing, or at the iteration cap; a stopped sample no longer changes.

The zero-iteration gate (``gate_threshold``, optionally with ``gate_rec_error`` on the
reconstruction error's largest pixel) is loop logic on top of the stop
check: a sample whose Lr at x0 is at most the gate (or the stop threshold) is
finished at iteration 0 (stop reason "gate"), in one of two ways the calibration
chooses between:

- ``gate_first_update`` (the default, and every calibration's before the choice
  existed): it keeps the first update, which the step at x0 has paid for, and takes
  no further step (1 iteration); its map DSSIM(x0, x1) is sharp where the model
  reconstructs badly;
- otherwise it takes no step: its projection is x0, so it needs f(x0) and Lr(x0)
  only, one forward pass and no gradient (the runtime runs its forward graph for it),
  and like every sample that took no step it is judged by its reconstruction's map
  DSSIM(x0, f(x0)), scaled (``eproj.decision``), never by the all-zero DSSIM(x0, x0).
  Cheaper, but that map is blurrier: on the brick models it cost 0.01-0.03 AUPRO on
  validation images, so their calibrations keep the first update.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from eproj.config import STOP_REASON_CODES, ProjectionConfig
from eproj.decision import GATE_REASON
from eproj.errors import ConfigError
from eproj.train.losses import reconstruction_loss
from eproj.train.models import Autoencoder

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
    loss, reconstruction, grad_lr = loss_terms(model, x)
    diff = x.detach() - x0
    energy = loss + lam * diff.abs().flatten(1).sum(dim=1)
    grad = grad_lr + lam * torch.sign(diff)
    return energy, loss, reconstruction, grad


def loss_terms(model: Autoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lr (N,), f(x) (N, C, H, W) and grad_x Lr (N, C, H, W) by autograd, detached:
    what the exported step graph computes without autograd."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        loss, reconstruction = reconstruction_loss(model, xg)
        grad_lr, = torch.autograd.grad(loss.sum(), xg)
    return loss.detach(), reconstruction.detach(), grad_lr


@dataclass
class UpdateResult:
    """State after one update: ``x``, ``m``, ``v`` (N, C, H, W; m, v None for the
    plain step), ``iterations`` (N,) counting applied steps, ``distance`` (N,) =
    ||x_new - x0||_1 and ``energy`` (N,) = loss + lam ||x - x0||_1 at the x the
    step started from."""

    x: torch.Tensor
    m: torch.Tensor | None
    v: torch.Tensor | None
    iterations: torch.Tensor
    distance: torch.Tensor
    energy: torch.Tensor


def update_step(x: torch.Tensor, x0: torch.Tensor, reconstruction: torch.Tensor, grad_lr: torch.Tensor,
                loss: torch.Tensor, active: torch.Tensor, iterations: torch.Tensor, config: ProjectionConfig,
                mask: torch.Tensor | None = None, m: torch.Tensor | None = None,
                v: torch.Tensor | None = None) -> UpdateResult:
    """The reference update: one step of the projection for the active samples.

    This is the definition the fused kernels (eproj.cpp_ext.update, C++ and CUDA)
    are tested against. It forms grad E = grad_lr + lam * sign(x - x0), weights it
    (config.weighting), takes a plain or Adam step (Adam's bias correction uses
    each sample's own step count, iterations + 1), clamps to the value range and
    leaves inactive samples, and their moments, untouched.

    Args:
        x, x0, reconstruction, grad_lr: (N, C, H, W) float tensors; reconstruction
            is f(x) and grad_lr is grad_x Lr at x.
        loss: (N,) Lr at x. active: (N,) bool. iterations: (N,) integer steps taken so far.
        mask: (N, 1 or C, H, W), Omega for ``weighting="mask"``.
        m, v: (N, C, H, W) Adam moments for ``step="adam"``.
    Returns:
        an UpdateResult of new tensors (the inputs are not modified).
    """
    n = x.shape[0]
    a = active.view(n, 1, 1, 1)
    diff = x - x0
    grad = grad_lr + config.lam * torch.sign(diff)
    if config.weighting == "hadamard":
        g = grad * (x - reconstruction) ** 2
    elif config.weighting == "mask":
        g = grad * mask
    else:
        g = grad
    if config.step == "adam":
        count = (iterations + 1).to(x.dtype).view(n, 1, 1, 1)
        m = torch.where(a, config.adam_beta1 * m + (1 - config.adam_beta1) * g, m)
        v = torch.where(a, config.adam_beta2 * v + (1 - config.adam_beta2) * g * g, v)
        m_hat = m / (1 - config.adam_beta1 ** count)
        v_hat = v / (1 - config.adam_beta2 ** count)
        stepped = x - config.alpha * m_hat / (v_hat.sqrt() + config.adam_eps)
    else:
        stepped = x - config.alpha * g
    stepped = stepped.clamp(config.value_min, config.value_max)
    x_new = torch.where(a, stepped, x)
    return UpdateResult(
        x=x_new, m=m, v=v,
        iterations=iterations + active.to(iterations.dtype),
        distance=(x_new - x0).abs().flatten(1).sum(dim=1),
        energy=loss + config.lam * diff.abs().flatten(1).sum(dim=1),
    )


@dataclass
class StopState:
    """Per-sample stop bookkeeping of the projection, all (N,): ``active`` bool;
    ``previous`` the energy at the previous check; ``reason`` int64 code into
    ``eproj.config.STOP_REASON_CODES``; ``final_loss`` and ``final_energy`` at the
    last iterate checked while the sample was active."""

    active: torch.Tensor
    previous: torch.Tensor
    reason: torch.Tensor
    final_loss: torch.Tensor
    final_energy: torch.Tensor

    @classmethod
    def start(cls, n: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> "StopState":
        """Every sample active, on ``device`` (default: torch's default device)."""
        return cls(torch.ones(n, dtype=torch.bool, device=device),
                   torch.full((n,), float("inf"), dtype=dtype, device=device),
                   torch.zeros(n, dtype=torch.int64, device=device), torch.zeros(n, dtype=dtype, device=device),
                   torch.zeros(n, dtype=dtype, device=device))


def stop_check(loss: torch.Tensor, distance: torch.Tensor, iterations: torch.Tensor, state: StopState,
               config: ProjectionConfig) -> StopState:
    """The reference stop check, run on each iterate before the update.

    This is the definition the fused kernels (eproj.cpp_ext.stop_check) are tested
    against. With E = loss + lam * distance, an active sample records E and its
    loss as final, then stops when loss <= config.stop_threshold ("threshold"), or
    else, once it has taken a step, when |E_prev - E| <= energy_tol |E_prev|
    ("converged"). Every sample's E becomes the next check's E_prev.

    Args:
        loss: (N,) Lr at the iterate. distance: (N,) ||x - x0||_1 at the iterate.
        iterations: (N,) steps taken so far. state: the previous check's state.
    Returns:
        the new StopState (the inputs are not modified).
    """
    energy = loss + config.lam * distance
    active = state.active
    reason = state.reason.clone()
    done = torch.zeros_like(active)
    if config.stop_threshold is not None:
        hit = active & (loss <= config.stop_threshold)
        reason[hit] = STOP_REASON_CODES.index("threshold")
        done |= hit
    if config.energy_tol > 0:
        flat = active & ~done & (iterations > 0) & \
            ((state.previous - energy).abs() <= config.energy_tol * state.previous.abs())
        reason[flat] = STOP_REASON_CODES.index("converged")
        done |= flat
    return StopState(active & ~done, energy, reason, torch.where(active, loss, state.final_loss),
                     torch.where(active, energy, state.final_energy))


def passes_gate(lr0: torch.Tensor, x0: torch.Tensor, reconstruction: torch.Tensor, gate_lr: float,
                gate_rec_error: float | None) -> torch.Tensor:
    """(N,) bool: Lr(x0) <= gate_lr and, with ``gate_rec_error``, the largest pixel of the
    channel-mean squared reconstruction error at most it (``eproj.decision.rec_error_map``)."""
    passed = lr0 <= gate_lr
    if gate_rec_error is not None:
        worst = ((x0 - reconstruction) ** 2).mean(dim=1).flatten(1).amax(dim=1)
        passed = passed & (worst <= gate_rec_error)
    return passed


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
            mask: torch.Tensor | None = None, gate_threshold: float | None = None,
            gate_rec_error: float | None = None, gate_first_update: bool = True) -> ProjectionResult:
    """Project a batch onto the model's normal manifold.

    Args:
        model: a trained autoencoder (put in eval mode by the caller).
        x0: (N, C, H, W) float32 images in [value_min, value_max].
        config: step parameters and stop criteria.
        mask: for ``weighting="mask"``, Omega of shape (N, 1 or C, H, W), 1 where
            pixels may change and 0 where they are known; required there, refused otherwise.
        gate_threshold: samples whose Lr(x0) is at most this, or at most the stop threshold,
            take no step (reason "gate"); None disables the gate (a sample under the stop
            threshold at x0 then takes no step either, with reason "threshold").
        gate_rec_error: with the gate, a sample passes it only if also the largest pixel of its
            reconstruction error (x0 - f(x0))^2 (channel mean) is at most this (None: Lr alone).
        gate_first_update: a gated sample keeps the first update, which the step at x0 has paid
            for (1 iteration, its map DSSIM(x0, x1)); False: it takes no step (0 iterations,
            projection x0, judged by its reconstruction map; the runtime then needs a forward
            pass only).
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
        mask = mask.to(device=x0.device, dtype=x0.dtype)
    n = x0.shape[0]
    x0 = x0.detach()
    x = x0.clone()
    gated = torch.zeros(n, dtype=torch.bool, device=x0.device)
    # every tensor of the loop lives on the input's device (CPU, CUDA, ...)
    iterations = torch.zeros(n, dtype=torch.int64, device=x0.device)
    state = StopState.start(n, x0.dtype, x0.device)
    m = torch.zeros_like(x0) if config.step == "adam" else None
    v = torch.zeros_like(x0) if config.step == "adam" else None
    with _frozen(model):
        for t in range(config.max_iters + 1):
            loss, reconstruction, grad_lr = loss_terms(model, x)
            state = stop_check(loss, (x - x0).abs().flatten(1).sum(dim=1), iterations, state, config)
            if t == 0 and gate_threshold is not None and config.max_iters > 0:
                # finished at x0: under the gate, or under the stop threshold (every sample is active
                # before the first check, which recorded Lr(x0) as final)
                gated = ~state.active | passes_gate(loss, x0, reconstruction, gate_threshold, gate_rec_error)
                state.active = (state.active | gated) if gate_first_update else (state.active & ~gated)
            if t == config.max_iters or not bool(state.active.any()):
                break
            step = update_step(x, x0, reconstruction, grad_lr, loss, state.active, iterations, config, mask, m, v)
            x, m, v, iterations = step.x, step.m, step.v, step.iterations
            if t == 0 and gate_first_update:
                state.active = state.active & ~gated  # they keep the first update, no further step
    reasons = [GATE_REASON if g else STOP_REASON_CODES[code] for g, code in zip(gated.tolist(), state.reason.tolist())]
    return ProjectionResult(x, iterations, state.final_loss, state.final_energy, reasons)
