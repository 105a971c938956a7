"""Shared fixtures: tiny models, small data folders in the MVTec AD layout, and
the `device` parameter: one test body runs on "cpu" (NumPy arrays) and on "cuda"
(torch CUDA tensors; skipped where no GPU can run the CUDA kernels)."""

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


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """One exported bundle per family (with step_fp16), from a briefly trained 32x32 model:
    family -> (TrainedModel, bundle folder)."""
    from eproj.export.onnx_graphs import export_bundle
    from eproj.train.checkpoint import load_model
    from eproj.train.models import FAMILIES, ModelConfig
    from eproj.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("bundles")
    folder = make_mvtec(root / "mvtec" / "nut", size=32)
    out = {}
    for family in FAMILIES:
        path = train(root / family, ModelConfig(family=family, size=32, latent=8),
                     TrainConfig(data=f"mvtec:{folder}", steps=3, batch=4, lr=1e-3), progress=False)
        export_bundle(path, root / f"{family}-bundle", fp16=True)
        out[family] = (load_model(path), root / f"{family}-bundle")
    return out


def _cuda_skip_reason() -> str:
    import eproj.cpp_ext as kernels

    reason = kernels.cuda_unavailable_reason()
    if reason:
        return f"CUDA kernels cannot run here: {reason}"
    if not torch.cuda.is_available():
        return "torch has no CUDA here"
    return ""


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    if request.param == "cuda":
        reason = _cuda_skip_reason()
        if reason:
            pytest.skip(reason)
    return request.param


class Arrays:
    """Moves NumPy arrays to the device under test and back."""

    def __init__(self, device: str):
        self.device = device

    def put(self, array: np.ndarray):
        if self.device == "cpu":
            return np.array(array, order="C", copy=True)  # the kernels write in place: never alias the caller's array
        return torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def empty(self, shape, dtype):
        if self.device == "cpu":
            return None  # the CPU path allocates its outputs
        return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda")

    def get(self, array) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array
        torch.cuda.synchronize()
        return array.cpu().numpy()


@pytest.fixture
def arrays(device) -> Arrays:
    return Arrays(device)
