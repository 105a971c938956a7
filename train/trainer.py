"""Training loop: Adam on augmented normal data, resumable checkpoints, then calibration.

The data for step t comes from a generator seeded by (seed, t), so a resumed
run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eproj.errors import CheckpointError, ConfigError
from eproj.train.checkpoint import (CHECKPOINT_FORMAT, FORMAT_VERSION, MODEL_FORMAT, load_payload,
                                    model_from_payload, save_atomic)
from eproj.train.corruption import PRESETS, corrupt
from eproj.train.data import TRAINING_FITS, DataSource, fit_of, load_source
from eproj.train.losses import reconstruction_term, training_loss
from eproj.train.models import ModelConfig, build_model
from eproj.train.adversarial import Adversary, adversarial_record
from eproj.train.puzzle import permutation_kind, puzzle_input, puzzle_loss, puzzle_record


REGIMES = ("plain", "corrupt", "puzzle")
UNET_WEIGHT_DECAY = 1e-5  # Adam's weight decay for the U-Net (Puzzle-AE's recipe); the autoencoders use none
# TrainConfig fields a resumed run must share with the run it resumes: they decide which
# batches are drawn and how each step moves the weights. ``steps`` (to extend a run),
# ``checkpoint_every`` and ``weights`` (the dtype of model.pt) may change.
RESUME_FIXED = ("batch", "lr", "seed", "kl_warmup", "fit")


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains; stored in its checkpoints. ``steps`` may grow on resume."""

    data: str
    steps: int = 10000
    batch: int = 16
    lr: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 250
    kl_warmup: int = 2000  # steps over which the KL weight ramps linearly from 0 to 1
    weights: str = "float32"  # dtype of the weights written to model.pt
    regime: str = "plain"  # "plain": reconstruct x; "corrupt": reconstruct x from a partly corrupted x
    corruption: str = "patches"  # the corruption preset of the corrupt regime (eproj.train.corruption.PRESETS)
    fit: str | None = None  # "tile" or "resize"; None: the data's default (eproj.train.data.fit_of)
    fgsm_eps: float = 0.01  # the puzzle regime's FGSM magnitude (eproj.train.puzzle); 0 disables it
    # Adam's weight decay (L2 added to the gradient); None: the family's default, UNET_WEIGHT_DECAY for
    # the unet family and 0 for the others (``resolved``)
    weight_decay: float | None = None
    adv_weight: float = 0.0  # lambda of the U-Net's adversarial term (eproj.train.adversarial); 0 disables it

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint interval must be >= 1, got {self.checkpoint_every}")
        if self.kl_warmup < 0:
            raise ConfigError(f"KL warm-up must be >= 0 steps, got {self.kl_warmup}")
        if self.weights not in ("float32", "float16"):
            raise ConfigError(f"weights must be float32 or float16, got {self.weights!r}")
        if self.regime not in REGIMES:
            raise ConfigError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        if self.corruption not in PRESETS:
            raise ConfigError(f"corruption must be one of {sorted(PRESETS)}, got {self.corruption!r}")
        if isinstance(self.fgsm_eps, bool) or not isinstance(self.fgsm_eps, (int, float)) \
                or not 0 <= self.fgsm_eps < 1:
            raise ConfigError(f"FGSM eps must be a number in [0, 1), got {self.fgsm_eps!r}")
        for name in ("weight_decay", "adv_weight"):
            value = getattr(self, name)
            if value is None and name == "weight_decay":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {value!r}")
        if self.adv_weight and self.regime == "corrupt" and self.corruption == "cevae":
            raise ConfigError("the adversarial term (--adv-weight) trains the U-Net's restorations; the cevae "
                              "corruption is the ceVAE's. Use --corruption patches, or --adv-weight 0")
        if self.fit is not None and self.fit not in TRAINING_FITS:
            raise ConfigError(f"fit must be one of {TRAINING_FITS} (or None: the data's default), got {self.fit!r}")

    def resolved(self, family: str) -> "TrainConfig":
        """This config with the family's default weight decay filled in."""
        if self.weight_decay is not None:
            return self
        return replace(self, weight_decay=UNET_WEIGHT_DECAY if family == "unet" else 0.0)

    def record(self) -> dict:
        """What a checkpoint stores: the fields, and the corruption's parameters when it is used."""
        out = asdict(self)
        if self.regime == "corrupt":
            out["corruption_config"] = PRESETS[self.corruption].to_dict()
        return out


def _checkpoint(model, optimizer, model_config: ModelConfig, train_config: TrainConfig, step: int,
                source: DataSource, adversary: Adversary | None = None) -> dict:
    """The checkpoint; its ``train`` record adds the input geometry the data was trained at
    (``input``: the fit chosen and, when tiled, the working scale), which model.pt and the
    bundle carry on for the runtime."""
    train = {**train_config.record(), "input": source.input_record()}
    if train_config.regime == "puzzle":
        train["puzzle"] = puzzle_record(permutation_kind(source.fit), train_config.fgsm_eps)
    if train_config.adv_weight:
        train["adversarial"] = adversarial_record(train_config.adv_weight)
    payload = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION,
               "config": model_config.to_dict(), "train": train, "step": step,
               "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if adversary is not None:
        payload["adversary"] = adversary.state()
    return payload


def _resume(path: Path, model_config: ModelConfig, train_config: TrainConfig, puzzle: dict | None = None):
    payload = load_payload(path, CHECKPOINT_FORMAT)
    stored = ModelConfig.from_dict(dict(payload["config"]))
    if stored != model_config:
        raise CheckpointError(f"{path} was trained with {stored}; this command asks for {model_config}. "
                              f"Use the same options to resume, or another --out for a new run")
    stored_data = payload["train"].get("data")
    if stored_data != train_config.data:
        raise CheckpointError(f"{path} was trained on {stored_data!r}; this command asks for "
                              f"{train_config.data!r}. Use another --out for a new run")
    stored_regime = (payload["train"].get("regime", "plain"), payload["train"].get("corruption", "patches"))
    if stored_regime != (train_config.regime, train_config.corruption):
        raise CheckpointError(f"{path} was trained with regime {stored_regime[0]} ({stored_regime[1]}); this "
                              f"command asks for {train_config.regime} ({train_config.corruption}). "
                              f"Use another --out for a new run")
    stored_puzzle = payload["train"].get("puzzle")
    if puzzle is not None and stored_puzzle != puzzle:
        stored_puzzle = stored_puzzle if isinstance(stored_puzzle, dict) else {}
        differ = [f"{k} {stored_puzzle.get(k)!r} (now {puzzle[k]!r})" for k in puzzle if stored_puzzle.get(k) != puzzle[k]]
        raise CheckpointError(f"{path} was trained with the puzzle settings {', '.join(differ)}; a resumed run keeps "
                              f"them. Use the same --fgsm-eps and data to resume, or another --out for a new run")
    shown = {None: "default"}  # an option left unset (the data's default fit)
    changed = [f"--{name.replace('_', '-')} {shown.get(payload['train'][name], payload['train'][name])} "
               f"(now {shown.get(getattr(train_config, name), getattr(train_config, name))})"
               for name in RESUME_FIXED
               if name in payload["train"] and payload["train"][name] != getattr(train_config, name)]
    if changed:
        raise CheckpointError(f"{path} was trained with {', '.join(changed)}; a resumed run keeps these. "
                              f"Use the same options to resume (only --steps, --checkpoint-every and --weights "
                              f"may change), or another --out for a new run")
    stored_adv = float(payload["train"].get("adv_weight", 0.0))
    if stored_adv != train_config.adv_weight:
        raise CheckpointError(f"{path} was trained with --adv-weight {stored_adv:g} (now {train_config.adv_weight:g}); "
                              f"a resumed run keeps it. Use another --out for a new run")
    adversary = None
    if train_config.adv_weight:
        if not isinstance(payload.get("adversary"), dict):
            raise CheckpointError(f"{path} records --adv-weight {stored_adv:g} but holds no discriminator state")
        adversary = Adversary.from_state(payload["adversary"], model_config.channels, model_config.size)
    model = model_from_payload(payload, path)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    optimizer.load_state_dict(payload["optimizer"])
    train_config = _resumed_weight_decay(path, payload, optimizer, train_config)
    return model, optimizer, int(payload["step"]), adversary, train_config


def _resumed_weight_decay(path: Path, payload: dict, optimizer, train_config: TrainConfig) -> TrainConfig:
    """The weight decay a resumed run goes on with: the one it recorded (a different --weight-decay is
    refused); a checkpoint from before eproj recorded it trained with its optimizer state's (Adam's
    default 0), kept and said on stderr. Returns the config with it filled in."""
    used = float(optimizer.param_groups[0].get("weight_decay", 0.0))
    stored = payload["train"].get("weight_decay")
    if stored is None:
        if train_config.weight_decay is not None and train_config.weight_decay != used:
            raise CheckpointError(f"{path} was trained with Adam weight decay {used:g} (its optimizer state; the "
                                  f"checkpoint predates recording it); this command asks for "
                                  f"{train_config.weight_decay:g}. Resume without --weight-decay, or use another --out")
        print(f"{path}: the checkpoint does not record its weight decay; it trained with {used:g} (its optimizer "
              f"state), and the resumed run keeps {used:g}", file=sys.stderr)
        return replace(train_config, weight_decay=used)
    if train_config.weight_decay is not None and float(stored) != train_config.weight_decay:
        raise CheckpointError(f"{path} was trained with --weight-decay {float(stored):g} (now "
                              f"{train_config.weight_decay:g}); a resumed run keeps it. Use another --out for a new run")
    for group in optimizer.param_groups:
        group["weight_decay"] = float(stored)
    return replace(train_config, weight_decay=float(stored))


def _step_loss(model, x: torch.Tensor, clean: np.ndarray, rng: np.random.Generator, config: TrainConfig,
               kl_scale: float, puzzle_kind: str = "all"):
    """The loss of one step under the run's regime.

    - plain: the family's training loss on x;
    - corrupt, ``patches``: reconstruct the clean x from a partly corrupted x;
    - corrupt, ``cevae``: the plain loss plus the context-encoding term, the
      clean x reconstructed from x with noise squares (Zimmerer et al.);
    - puzzle: reconstruct the clean x from its 2x2 puzzle with one tile corrupted,
      under FGSM (eproj.train.puzzle), the permutations from the set ``puzzle_kind``.
    """
    if config.regime == "plain":
        return training_loss(model, x, kl_scale)
    if config.regime == "puzzle":
        return puzzle_loss(model, clean, rng, puzzle_kind, config.fgsm_eps, kl_scale)
    corrupted = torch.from_numpy(corrupt(rng, clean, PRESETS[config.corruption])[0])
    if config.corruption == "cevae":
        loss, logs = training_loss(model, x, kl_scale)
        context, context_logs = training_loss(model, corrupted, kl_scale, target=x, with_kl=False)
        return loss + context, {**logs, "ce": context_logs["rec"]}
    return training_loss(model, corrupted, kl_scale, target=x)


def _adversarial_step_loss(model, adversary: Adversary, x: torch.Tensor, clean: np.ndarray,
                           rng: np.random.Generator, config: TrainConfig, puzzle_kind: str):
    """The U-Net's loss with the adversarial term, L_rec + lambda * L_adv (``eproj.train.adversarial``),
    on the regime's input (the same draws as ``_step_loss``); also the restoration, for D's step."""
    if config.regime == "puzzle":
        inputs = puzzle_input(model, clean, rng, puzzle_kind, config.fgsm_eps)
    elif config.regime == "corrupt":
        inputs = torch.from_numpy(corrupt(rng, clean, PRESETS[config.corruption])[0])
    else:
        inputs = x
    restored = model(inputs)
    rec = reconstruction_term(model, x, restored).mean()
    adv = adversary.generator_term(x, restored)
    return rec + config.adv_weight * adv, {"rec": float(rec.detach()), "adv": float(adv.detach())}, restored


def train(run_dir: str | Path, model_config: ModelConfig, train_config: TrainConfig,
          calibrate_after: bool = True, progress: bool = True) -> Path:
    """Train (or resume) the run in ``run_dir`` up to ``train_config.steps`` steps.

    Writes ``checkpoint.pt`` every ``checkpoint_every`` steps and on interruption,
    then calibrates and writes ``model.pt``. Returns the path of ``model.pt``
    (or of ``checkpoint.pt`` when ``calibrate_after`` is False).
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    source = load_source(train_config.data, size=model_config.size, seed=train_config.seed, fit=train_config.fit)
    if progress:
        why = "--fit" if train_config.fit else f"the default for {train_config.data}"
        scale = (f"; working scale {source.scale:g} (images resized by it before cropping)"
                 if source.fit == "tile" else "")
        print(f"fit {source.fit} ({why}){scale}", file=sys.stderr)
    if source.channels != model_config.channels:
        raise ConfigError(f"{train_config.data} has {source.channels}-channel images; "
                          f"the model was asked for {model_config.channels} channel(s)")
    puzzle_kind = permutation_kind(source.fit)
    puzzle = puzzle_record(puzzle_kind, train_config.fgsm_eps) if train_config.regime == "puzzle" else None
    if train_config.adv_weight and model_config.family != "unet":
        raise ConfigError(f"the adversarial term (--adv-weight) is the U-Net's (--model unet); got --model "
                          f"{model_config.family}")
    if ckpt_path.exists():
        model, optimizer, step, adversary, train_config = _resume(ckpt_path, model_config, train_config, puzzle)
    else:
        train_config = train_config.resolved(model_config.family)
        torch.manual_seed(train_config.seed)
        model = build_model(model_config)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr,
                                     weight_decay=float(train_config.weight_decay or 0.0))  # resolved: not None
        adversary = Adversary(model_config.channels, model_config.size) if train_config.adv_weight else None
        step = 0
    if progress:
        print(f"Adam: lr {train_config.lr:g}, weight decay {train_config.weight_decay:g}"
              + (f"; adversarial term weight {train_config.adv_weight:g}" if adversary else ""), file=sys.stderr)
    bar = tqdm(total=train_config.steps, initial=step, desc=f"train {model_config.family}",
               unit="step", disable=not progress, dynamic_ncols=True)
    last_save = time.monotonic()
    try:
        while step < train_config.steps:
            rng = np.random.default_rng([train_config.seed, step])
            torch.manual_seed(train_config.seed * 1_000_003 + step)
            clean = source.train_batch(rng, train_config.batch)
            x = torch.from_numpy(clean)
            kl_scale = min(1.0, (step + 1) / train_config.kl_warmup) if train_config.kl_warmup else 1.0
            if adversary is None:
                loss, logs = _step_loss(model, x, clean, rng, train_config, kl_scale, puzzle_kind)
            else:
                loss, logs, restored = _adversarial_step_loss(model, adversary, x, clean, rng, train_config,
                                                              puzzle_kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if adversary is not None:
                logs["d"] = adversary.step(x, restored.detach())
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
            if step % train_config.checkpoint_every == 0 or time.monotonic() - last_save > 600:
                save_atomic(_checkpoint(model, optimizer, model_config, train_config, step, source, adversary), ckpt_path)
                last_save = time.monotonic()
    finally:
        bar.close()
        save_atomic(_checkpoint(model, optimizer, model_config, train_config, step, source, adversary), ckpt_path)
    if not calibrate_after:
        return ckpt_path
    from eproj.train.calibrate import write_model

    out = write_model(run_dir, progress=progress)
    if source.fit != fit_of(train_config.data):
        _check_calibrated_fit(out, source)
    return out


def _check_calibrated_fit(path: Path, source: DataSource) -> None:
    """With a fit other than the data's default, model.pt must have been calibrated on the
    inputs of that fit (tiles, not resized images, at the same working scale); otherwise its
    thresholds belong to another geometry: model.pt is removed and CheckpointError says so."""
    calibrated = load_payload(path, MODEL_FORMAT)["calibration"].get("input")
    if calibrated != source.input_record():
        path.unlink()
        raise CheckpointError(f"{path} was calibrated on inputs {calibrated}, but {source.spec} was trained on "
                              f"{source.input_record()}: its thresholds do not apply; model.pt was removed")
