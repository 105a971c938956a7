"""Shared fixtures: tiny models and small data folders in the MVTec AD layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def write_image(path: Path, image: np.ndarray) -> None:
    """Write (H, W) or (H, W, 3 RGB) float [0, 1] as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    if data.ndim == 3:
        data = data[:, :, ::-1]
    assert cv2.imwrite(str(path), data)


def texture(rng: np.random.Generator, size: int, channels: int = 1) -> np.ndarray:
    """A smooth random texture (H, W) or (H, W, C) in [0, 1]."""
    noise = rng.normal(0, 1, (size, size, channels)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2)
    smooth = smooth.reshape(size, size, channels)
    out = 0.5 + 0.15 * smooth / (smooth.std() + 1e-6)
    return np.clip(out, 0, 1)[:, :, 0] if channels == 1 else np.clip(out, 0, 1)


def make_mvtec(root: Path, n_train: int = 6, size: int = 48, channels: int = 1, defects=("crack",),
               n_test: int = 2, seed: int = 0) -> Path:
    """A small category folder in the MVTec AD layout; returns its path."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        write_image(root / "train" / "good" / f"{i:03d}.png", texture(rng, size, channels))
    for i in range(n_test):
        write_image(root / "test" / "good" / f"{i:03d}.png", texture(rng, size, channels))
    for defect in defects:
        for i in range(n_test):
            img = texture(rng, size, channels)
            mask = np.zeros((size, size), bool)
            mask[10:20, 12 + i:25 + i] = True
            img[mask] = 0.05
            write_image(root / "test" / defect / f"{i:03d}.png", img)
            write_image(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.float32))
    return root


@pytest.fixture
def mvtec_folder(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "mvtec" / "bottle")


@pytest.fixture
def tiny_model():
    """A factory of small untrained-but-nonzero models in float64 for gradient checks."""
    from eproj.train.models import ModelConfig, build_model

    def make(family: str = "l2ae", size: int = 32, channels: int = 1, latent: int = 8,
             architecture: str = "bergmann", dtype=torch.float64, seed: int = 0):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(family=family, architecture=architecture, size=size,
                                        channels=channels, latent=latent))
        if family == "gvae":
            with torch.no_grad():
                model.log_gamma.fill_(-1.0)
        return model.to(dtype).eval()

    return make
