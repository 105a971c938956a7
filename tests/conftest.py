"""Shared fixtures: tiny models, small data folders in the MVTec AD layout, and
the `device` parameter: one test body runs on "cpu" (NumPy arrays), on "cuda"
(torch CUDA tensors; skipped where no GPU can run the CUDA kernels) and on "sim"
(the CUDA kernels on the simulated device of cpp_ext/sim, with arrays in its
device memory; skipped where eproj was built without EPROJ_CUDA_SIM=ON)."""

from __future__ import annotations

import importlib
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
             architecture: str | None = None, dtype=torch.float64, seed: int = 0):
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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_sim: runs the CUDA kernels on the simulated device (cpp_ext/sim)")


def _simulated_kernels():
    """eproj.cpp_ext._kernels_sim, or None where eproj was built without it."""
    try:
        return importlib.import_module("eproj.cpp_ext._kernels_sim")
    except ImportError:
        return None


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("sim", marks=pytest.mark.cuda_sim)])
def device(request, monkeypatch) -> str:
    if request.param == "cuda":
        reason = _cuda_skip_reason()
        if reason:
            pytest.skip(reason)
    if request.param == "sim":
        sim = _simulated_kernels()
        if sim is None:
            pytest.skip("the simulated CUDA device is not built: install eproj with "
                        "-Ccmake.define.EPROJ_CUDA_SIM=ON (make install does)")
        import eproj.cpp_ext

        # every eproj.cpp_ext call of this test goes to the simulated module
        monkeypatch.setattr(eproj.cpp_ext, "_module", sim)
    return request.param


class Arrays:
    """Moves NumPy arrays to the device under test and back. On "sim" the
    arrays are eproj.cpp_ext.device_array views of the simulated device's
    memory (NaN bytes until written), freed by ``close``."""

    def __init__(self, device: str, sim=None):
        self.device = device
        self._sim = sim
        self._allocations: list[int] = []
        self._streams: list[int] = []

    def _allocate(self, nbytes: int) -> int:
        pointer = self._sim.malloc(nbytes)
        if pointer:
            self._allocations.append(pointer)
        return pointer

    def put(self, array: np.ndarray):
        if self.device == "cpu":
            return np.array(array, order="C", copy=True)  # the kernels write in place: never alias the caller's array
        if self.device == "sim":
            from eproj.cpp_ext import device_array

            host = np.ascontiguousarray(array)
            pointer = self._allocate(host.nbytes)
            self._sim.memcpy(pointer, host.ctypes.data, host.nbytes, "host_to_device")
            return device_array(pointer, host.shape, host.dtype.name)
        return torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def empty(self, shape, dtype):
        if self.device == "cpu":
            return None  # the CPU path allocates its outputs
        if self.device == "sim":
            from eproj.cpp_ext import device_array

            return device_array(self._allocate(int(np.prod(shape)) * np.dtype(dtype).itemsize), tuple(shape),
                                np.dtype(dtype).name)
        return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda")

    def get(self, array) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array
        if self.device == "sim":
            interface = array.__cuda_array_interface__
            host = np.empty(interface["shape"], np.dtype(interface["typestr"]))
            self._sim.memcpy(host.ctypes.data, interface["data"][0], host.nbytes, "device_to_host")
            return host
        torch.cuda.synchronize()  # every stream
        return array.cpu().numpy()

    def stream(self):
        """A stream of the device other than the default one (None on the CPU);
        the copies made so far are complete when it returns."""
        if self.device == "cpu":
            return None
        if self.device == "sim":
            handle = self._sim.stream_create()
            self._streams.append(handle)
            return handle
        torch.cuda.synchronize()
        return torch.cuda.Stream()

    def close(self) -> None:
        """Free the simulated device memory; fail when a launch left the device in error."""
        if self._sim is None:
            return
        name, message = self._sim.get_last_error()
        self._sim.clear_sticky_error()
        for pointer in self._allocations:
            self._sim.free(pointer)
        for handle in self._streams:
            self._sim.stream_destroy(handle)
        self._allocations.clear()
        self._streams.clear()
        if name != "cudaSuccess":
            pytest.fail(f"the test left the simulated device in error: {name}: {message}")


@pytest.fixture
def arrays(device):
    import eproj.cpp_ext

    helper = Arrays(device, eproj.cpp_ext._module if device == "sim" else None)
    yield helper
    helper.close()


@pytest.fixture
def one_torch_thread():
    """Tiny tensors on one torch thread (two OpenMP threads spin against each other on shared
    cores); the previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
