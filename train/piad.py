"""PIAD: Perceptual Image Anomaly Detection (Tuluptceva et al.), training.

An encoder E maps images to a latent N(0, I), a generator G maps latents to images;
both are trained adversarially (image critic D_X, latent critic D_Z, WGAN-GP, Eqs. 5-6)
and by the relative-perceptual-L1 reconstruction loss of G(E(x)) (Eq. 7, see
``eproj.train.perceptual``), whose weights gamma_G, gamma_E follow the
gradient-normalising weight policy (§3.3, Algorithms 1-3). The anomaly score of an
image is A(x) = L_rel-perc-L1(x, G(E(x))) (Eq. 1).

The networks are ``eproj.train.piad_networks`` (re-exported here); calibration is
``eproj.train.piad_calibrate``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from eproj.errors import CheckpointError, ConfigError, DataError
from eproj.train.checkpoint import FORMAT_VERSION, load_payload, save_atomic
from eproj.train.perceptual import RECONSTRUCTION_LOSSES, FeatureStats, measure_feature_stats, reconstruction_distance
from eproj.train.piad_networks import (LEAK, PIAD, Critics, Encoder, Generator, ImageCritic, LatentCritic,  # noqa: F401
                                       MinibatchStddev, PIADConfig, PreActBlock, anomaly_score, from_model_range,
                                       kaiming_init, to_model_range)

PIAD_CHECKPOINT_FORMAT = "eproj-piad-checkpoint"
GAMMA_REDUCTIONS = ("mean", "median")


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PIADTrainConfig:
    """How PIAD trains (supplement §1: n_dis 2, lambda 10, drift 0.001, Adam (0.5, 0.99), lr 5e-4
    critics and 2e-4 E/G, batch 32; §1.2: n_weight 100). ``steps`` counts generator steps."""

    steps: int = 1000
    batch: int = 32
    n_dis: int = 2
    lr_critics: float = 5e-4
    lr_generator: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.99
    gp_weight: float = 10.0
    drift_weight: float = 0.001
    n_weight: int = 100
    history_size: int = 200
    smoothing: float = 0.05
    gamma_reduction: str = "mean"
    seed: int = 0
    checkpoint_every: int = 250
    stats_images: int = 256  # training images mu and sigma of the features are measured on
    # the reconstruction term (``eproj.train.perceptual.RECONSTRUCTION_LOSSES``): the paper's
    # rel_perc_l1, or another of its ablation (§4.2), which then is the model's score too
    reconstruction_loss: str = "rel_perc_l1"

    def __post_init__(self) -> None:
        for name in ("batch", "n_dis", "n_weight", "history_size", "checkpoint_every", "stats_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        for name in ("lr_critics", "lr_generator"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.gp_weight < 0 or self.drift_weight < 0:
            raise ConfigError(f"gradient penalty and drift weights must be >= 0, got {self.gp_weight}, "
                              f"{self.drift_weight}")
        if not 0 < self.smoothing <= 1:
            raise ConfigError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ConfigError(f"reconstruction loss must be one of {RECONSTRUCTION_LOSSES}, got "
                              f"{self.reconstruction_loss!r}")
        if self.gamma_reduction not in GAMMA_REDUCTIONS:
            raise ConfigError(f"gamma reduction must be one of {GAMMA_REDUCTIONS}, got {self.gamma_reduction!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# fields a resumed run may change; every other must be the run's own
RESUME_MAY_CHANGE = ("steps", "checkpoint_every")
# fields of a checkpoint's data record (``train_piad``'s ``data``) a resumed run must share
DATA_FIXED = ("data", "fit", "input")


# --------------------------------------------------------------------------------------
# WGAN-GP (Eqs. 5-6, supplement §1)
# --------------------------------------------------------------------------------------

def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     eps: torch.Tensor | None = None) -> torch.Tensor:
    """GP = E[(||grad D(x^)||_2 - 1)^2], x^ = eps real + (1 - eps) fake, eps ~ U[0, 1] per sample
    (Gulrajani et al.); differentiable in the critic's parameters. ``eps`` (N,) may be given."""
    if eps is None:
        eps = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    eps = eps.view(-1, *([1] * (real.ndim - 1)))
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, gp_weight: float,
                drift_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_disc (Eq. 5) = E[D(fake)] - E[D(real)] + gp_weight GP + drift_weight E[D(real)^2]."""
    d_real, d_fake = critic(real), critic(fake.detach())
    wasserstein = d_fake.mean() - d_real.mean()
    gp = gradient_penalty(critic, real, fake)
    drift = (d_real ** 2).mean()
    loss = wasserstein + gp_weight * gp + drift_weight * drift
    return loss, {"w": float(wasserstein.detach()), "gp": float(gp.detach())}


# --------------------------------------------------------------------------------------
# gradient-normalising weights (§3.3, Algorithms 2-3, supplement §1.2)
# --------------------------------------------------------------------------------------

def conv_gradient_stds(network: nn.Module) -> dict[str, float]:
    """The std (population) of the weight gradient of every conv layer of ``network`` that has one,
    by module name; the supplement's stand-in for the L2 norm of Algorithm 2."""
    out = {}
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d) and module.weight.grad is not None:
            out[name] = float(module.weight.grad.double().std(correction=0))
    return out


def exponential_smoothing(values: list[float], alpha: float) -> list[float]:
    """s_0 = v_0, s_t = alpha v_t + (1 - alpha) s_{t-1}."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def select_weight(history_1: dict[str, list[float]], history_2: dict[str, list[float]], alpha: float,
                  last_n: int, reduction: str = "mean") -> float | None:
    """Algorithm 3: per layer, the mean over the last ``last_n`` smoothed entries of history_1 /
    history_2; then their mean (the paper) or median over layers. Layers whose loss-2 gradients
    vanished are skipped; None when no layer is left."""
    per_layer = []
    for layer, values_1 in history_1.items():
        values_2 = history_2.get(layer)
        if not values_2 or len(values_2) != len(values_1):
            continue
        s1 = np.asarray(exponential_smoothing(values_1, alpha)[-last_n:])
        s2 = np.asarray(exponential_smoothing(values_2, alpha)[-last_n:])
        if np.all(s2 > 0):
            per_layer.append(float(np.mean(s1 / s2)))
    if not per_layer:
        return None
    return float(np.median(per_layer) if reduction == "median" else np.mean(per_layer))


class GradientNormalizer:
    """gamma_G and gamma_E of Eqs. 8-9 (1 until the first measurement), and the gradient
    history they are selected from: per loss (adv_G, adv_E, rec_G, rec_E: the reconstruction
    loss's gradients in G and in E), per conv layer, the last ``history_size`` measurements."""

    KEYS = ("adv_G", "adv_E", "rec_G", "rec_E")

    def __init__(self, history_size: int = 200, smoothing: float = 0.05, reduction: str = "mean") -> None:
        self.history_size, self.smoothing, self.reduction = history_size, smoothing, reduction
        self.history: dict[str, dict[str, list[float]]] = {key: {} for key in self.KEYS}
        self.gamma_G = self.gamma_E = 1.0

    def record(self, key: str, network: nn.Module) -> None:
        """Algorithm 2: append the conv weight-gradient stds of ``network`` to ``history[key]``."""
        for layer, std in conv_gradient_stds(network).items():
            values = self.history[key].setdefault(layer, [])
            values.append(std)
            del values[:-self.history_size]

    def select(self) -> None:
        """Algorithm 3 for gamma_G (adv_G over rec_G) and gamma_E (adv_E over rec_E)."""
        for name, adv, rec in (("gamma_G", "adv_G", "rec_G"), ("gamma_E", "adv_E", "rec_E")):
            gamma = select_weight(self.history[adv], self.history[rec], self.smoothing, self.history_size,
                                  self.reduction)
            if gamma is not None:
                setattr(self, name, gamma)

    def state_dict(self) -> dict:
        return {"gamma_G": self.gamma_G, "gamma_E": self.gamma_E,
                "history": {k: {layer: list(v) for layer, v in h.items()} for k, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.gamma_G, self.gamma_E = float(state["gamma_G"]), float(state["gamma_E"])
        self.history = {key: {layer: [float(v) for v in values] for layer, values in state["history"][key].items()}
                        for key in self.KEYS}


# --------------------------------------------------------------------------------------
# one training step (Algorithm 1)
# --------------------------------------------------------------------------------------

@dataclass
class PIADState:
    """Everything a run's training changes: the networks, their optimizers and the normaliser."""

    model: PIAD
    critics: Critics
    opt_critics: torch.optim.Adam
    opt_generator: torch.optim.Adam
    normalizer: GradientNormalizer
    stats: FeatureStats

    @classmethod
    def new(cls, config: PIADConfig, train: PIADTrainConfig, stats: FeatureStats) -> "PIADState":
        model, critics = PIAD(config), Critics(config)
        betas = (train.beta1, train.beta2)
        return cls(model, critics, torch.optim.Adam(critics.parameters(), lr=train.lr_critics, betas=betas),
                   torch.optim.Adam(model.parameters(), lr=train.lr_generator, betas=betas),
                   GradientNormalizer(train.history_size, train.smoothing, train.gamma_reduction), stats)


def _set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def training_step(state: PIADState, feature_network: nn.Module, batches: list[torch.Tensor], step: int,
                  train: PIADTrainConfig) -> dict[str, float]:
    """One iteration of Algorithm 1: ``n_dis`` critic updates (one batch each), then one E/G update
    on the last batch, gamma_G and gamma_E re-selected first when ``step % n_weight == 0``.
    ``batches``: n_dis + 1 tensors (N, C, S, S) in [0, 1]. z ~ N(0, I) from torch's global RNG."""
    if len(batches) != train.n_dis + 1:
        raise ValueError(f"training_step needs n_dis + 1 = {train.n_dis + 1} batches, got {len(batches)}")
    E, G = state.model.encoder, state.model.generator
    D_X, D_Z = state.critics.image, state.critics.latent
    latent = state.model.config.latent
    logs: dict[str, float] = {}
    _set_trainable(state.critics, True)
    for x01 in batches[:-1]:
        x = to_model_range(x01)
        z = torch.randn(x.shape[0], latent)
        with torch.no_grad():
            fake_x, fake_z = G(z), E(x)
        loss_x, logs_x = critic_loss(D_X, x, fake_x, train.gp_weight, train.drift_weight)
        loss_z, logs_z = critic_loss(D_Z, z, fake_z, train.gp_weight, train.drift_weight)
        state.opt_critics.zero_grad(set_to_none=True)
        (loss_x + loss_z).backward()
        state.opt_critics.step()
    logs.update({"w_x": logs_x["w"], "w_z": logs_z["w"]})

    _set_trainable(state.critics, False)
    x01 = batches[-1]
    x = to_model_range(x01)
    z = torch.randn(x.shape[0], latent)
    code = E(x)
    adv_G = -D_X(G(z)).mean()  # Eq. 6 without its first term, constant in G
    adv_E = -D_Z(code).mean()  # the same for E and D_Z
    rec = reconstruction_distance(train.reconstruction_loss, feature_network, state.stats, x01,
                                  from_model_range(G(code))).mean()  # Eq. 7 (rel_perc_l1)
    if step % train.n_weight == 0:
        for key, loss, network in (("adv_G", adv_G, G), ("adv_E", adv_E, E), ("rec", rec, None)):
            state.opt_generator.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            if network is None:
                state.normalizer.record("rec_G", G)
                state.normalizer.record("rec_E", E)
            else:
                state.normalizer.record(key, network)
        state.normalizer.select()
    state.opt_generator.zero_grad(set_to_none=True)
    rec.backward(retain_graph=True)
    for network, gamma in ((G, state.normalizer.gamma_G), (E, state.normalizer.gamma_E)):
        for p in network.parameters():
            if p.grad is not None:
                p.grad.mul_(gamma)
    (adv_G + adv_E).backward()
    state.opt_generator.step()
    _set_trainable(state.critics, True)
    logs.update({"rec": float(rec.detach()), "adv_G": float(adv_G.detach()), "adv_E": float(adv_E.detach()),
                 "gamma_G": state.normalizer.gamma_G, "gamma_E": state.normalizer.gamma_E})
    return logs


# --------------------------------------------------------------------------------------
# the resumable training loop
# --------------------------------------------------------------------------------------

class BatchSource(Protocol):
    """What ``train_piad`` draws from (``eproj.train.data.DataSource`` is one)."""

    def train_batch(self, rng: np.random.Generator, batch: int) -> np.ndarray: ...


_STATS_STREAM = 2**32 - 1  # the data RNG stream of the feature statistics (steps use 0, 1, ...)


def _draw(source: BatchSource, rng: np.random.Generator, n: int, config: PIADConfig) -> torch.Tensor:
    batch = source.train_batch(rng, n)
    want = (n, config.channels, config.size, config.size)
    if not isinstance(batch, np.ndarray) or batch.shape != want or batch.dtype != np.float32:
        raise DataError(f"the training data must give batches {want} float32 in [0, 1], got "
                        f"{getattr(batch, 'shape', type(batch).__name__)} {getattr(batch, 'dtype', '')}")
    if not np.isfinite(batch).all() or batch.min() < 0 or batch.max() > 1:
        raise DataError(f"the training data must be finite and in [0, 1], got a batch in "
                        f"[{np.nanmin(batch)}, {np.nanmax(batch)}] with {int((~np.isfinite(batch)).sum())} "
                        f"non-finite values")
    return torch.from_numpy(np.ascontiguousarray(batch))


def _detail(exc: Exception) -> str:
    """An exception's message on one line, at most 300 characters (load_state_dict's first line
    names no tensor)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text[:300] if text else "no detail"

def _checkpoint(state: PIADState, config: PIADConfig, train: PIADTrainConfig, features: dict, step: int,
                data: dict | None = None) -> dict:
    return {"format": PIAD_CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "config": config.to_dict(),
            "train": train.to_dict(), "features": dict(features), "stats": state.stats.to_dict(), "step": step,
            "data": dict(data or {}),
            "encoder": state.model.encoder.state_dict(), "generator": state.model.generator.state_dict(),
            "image_critic": state.critics.image.state_dict(), "latent_critic": state.critics.latent.state_dict(),
            "opt_critics": state.opt_critics.state_dict(), "opt_generator": state.opt_generator.state_dict(),
            "normalizer": state.normalizer.state_dict()}


def _resume(path: Path, config: PIADConfig, train: PIADTrainConfig, features: dict,
            data: dict | None = None) -> tuple[PIADState, int]:
    payload = load_payload(path, PIAD_CHECKPOINT_FORMAT)
    stored_data = payload.get("data") or {}
    changed_data = [f"{k} {stored_data.get(k)!r} (now {v!r})" for k, v in (data or {}).items()
                    if k in DATA_FIXED and stored_data.get(k) != v]
    if changed_data:
        raise CheckpointError(f"{path} was trained with {', '.join(changed_data)}; a resumed run keeps its data. "
                              f"Use the same --data and --fit to resume, or another --out for a new run")
    if payload.get("config") != config.to_dict():
        raise CheckpointError(f"{path} was trained with {payload.get('config')}; this run asks for "
                              f"{config.to_dict()}. Use the same options to resume, or another run folder")
    stored = payload.get("train", {})
    defaults = PIADTrainConfig().to_dict()  # a field newer than the checkpoint: it trained with the default
    changed = [f"{k} {stored.get(k, defaults[k])!r} (now {v!r})" for k, v in train.to_dict().items()
               if k not in RESUME_MAY_CHANGE and stored.get(k, defaults[k]) != v]
    if changed:
        raise CheckpointError(f"{path} was trained with {', '.join(changed)}; a resumed run keeps these "
                              f"(only {', '.join(RESUME_MAY_CHANGE)} may change)")
    if payload.get("features") != features:
        raise CheckpointError(f"{path} was trained with the feature network {payload.get('features')}; this run "
                              f"uses {features}")
    try:
        state = PIADState.new(config, train, FeatureStats.from_dict(payload["stats"]))
        state.model.encoder.load_state_dict(payload["encoder"])
        state.model.generator.load_state_dict(payload["generator"])
        state.critics.image.load_state_dict(payload["image_critic"])
        state.critics.latent.load_state_dict(payload["latent_critic"])
        state.opt_critics.load_state_dict(payload["opt_critics"])
        state.opt_generator.load_state_dict(payload["opt_generator"])
        state.normalizer.load_state_dict(payload["normalizer"])
    except (KeyError, RuntimeError, ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} does not fit this PIAD run ({type(exc).__name__}: "
                              f"{_detail(exc)})") from None
    return state, int(payload["step"])


def train_piad(run_dir: str | Path, config: PIADConfig, train: PIADTrainConfig, source: BatchSource,
               feature_network: nn.Module, features: dict[str, Any], progress: bool = True,
               data: dict[str, Any] | None = None) -> Path:
    """Train (or resume) the PIAD run in ``run_dir`` up to ``train.steps`` generator steps.

    ``feature_network``: the frozen perceptual network (``eproj.train.perceptual.build_feature_network``);
    ``features``: what the checkpoint records of it (network, tap, weights), checked on resume.
    On a new run, mu and sigma of its features are measured on ``train.stats_images`` training
    images (source ``training-images``). The data of step t comes from a NumPy generator seeded
    by (seed, t) and z, the interpolation weights from torch's generator seeded by (seed, t), so a
    resumed run continues exactly as an uninterrupted one. Writes ``checkpoint.pt`` (all networks,
    both optimizers, the gradient history, mu and sigma) every ``checkpoint_every`` steps, every
    10 minutes and on exit; returns its path. ``data``: what the checkpoint records of the
    training data (``run_piad``'s: spec, fit, input geometry, ...); its ``DATA_FIXED`` fields
    must match on resume, the rest is refreshed.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        state, step = _resume(ckpt_path, config, train, features, data)
    else:
        rng = np.random.default_rng([train.seed, _STATS_STREAM])
        counts = [min(train.batch, train.stats_images - i) for i in range(0, train.stats_images, train.batch)]
        stats = measure_feature_stats(feature_network, (_draw(source, rng, n, config) for n in counts))
        torch.manual_seed(train.seed)
        state, step = PIADState.new(config, train, stats), 0
        if progress:
            print(f"PIAD feature mu/sigma measured on {stats.count} training images "
                  f"({features.get('network')}, {stats.mean.numel()} channels)", file=sys.stderr)
    state.model.train()
    state.critics.train()
    bar = tqdm(total=train.steps, initial=step, desc="train piad", unit="step", disable=not progress,
               dynamic_ncols=True)
    last_save = time.monotonic()
    in_step = False  # an interrupted step leaves the state half-updated: it is not saved
    try:
        while step < train.steps:
            rng = np.random.default_rng([train.seed, step])
            torch.manual_seed(train.seed * 1_000_003 + step)
            batches = [_draw(source, rng, train.batch, config) for _ in range(train.n_dis + 1)]
            in_step = True
            logs = training_step(state, feature_network, batches, step, train)
            if not all(math.isfinite(v) for v in logs.values()):
                raise CheckpointError(f"PIAD training diverged at step {step + 1}: {logs}; {ckpt_path} keeps "
                                      f"the last checkpoint before it")
            step += 1
            in_step = False
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()}, refresh=False)
            if step % train.checkpoint_every == 0 or time.monotonic() - last_save > 600:
                save_atomic(_checkpoint(state, config, train, features, step, data), ckpt_path)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        if not in_step:
            save_atomic(_checkpoint(state, config, train, features, step, data), ckpt_path)
        raise
    finally:
        bar.close()
    save_atomic(_checkpoint(state, config, train, features, step, data), ckpt_path)
    return ckpt_path


def piad_from_checkpoint(path: str | Path) -> tuple[PIAD, FeatureStats, dict[str, Any], int]:
    """The E/G model (eval mode), the feature statistics, the feature record and the step of a
    ``train_piad`` checkpoint (what calibration and export start from). CheckpointError when the
    file is not one or its weights do not fit its config."""
    path = Path(path)
    payload = load_payload(path, PIAD_CHECKPOINT_FORMAT)
    try:
        config = PIADConfig.from_dict(dict(payload["config"]))
        model = PIAD(config)
        model.encoder.load_state_dict(payload["encoder"])
        model.generator.load_state_dict(payload["generator"])
        stats = FeatureStats.from_dict(payload["stats"])
    except (KeyError, RuntimeError, ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} is not a valid PIAD checkpoint ({type(exc).__name__}: "
                              f"{_detail(exc)})") from None
    for name, tensor in model.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight {name} holds NaN or Inf values (a diverged or damaged run)")
    model.eval()
    return model, stats, dict(payload["features"]), int(payload["step"])
