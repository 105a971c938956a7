"""The fused DSSIM map against the reference eproj.train.losses.dssim_map
(evaluated in float64) within 1e-5, and against scikit-image's full SSIM map
within 1e-4, on real images (scikit-image's textures and photographs) and random
ones, odd sizes, 1 and 3 channels, batch 1 and 17."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import structural_similarity

import eproj.cpp_ext as kernels
from eproj.errors import ArrayError, ConfigError
from eproj.train.losses import dssim_map as reference_dssim

# a host pointer passed as device memory: the CUDA build names it; a build without the CUDA
# kernels (the default pip install) cannot tell, and refuses every CUDA array, saying why
HOST_POINTER_AS_DEVICE = ("x: expected device memory" if kernels.build_info()["cuda"] else
                          "x is a CUDA array, but the CUDA kernels cannot run here: eproj was built without CUDA")


def _reference(x: np.ndarray, y: np.ndarray, **kw) -> np.ndarray:
    return reference_dssim(torch.from_numpy(x).double(), torch.from_numpy(y).double(), **kw).numpy()


def _skimage(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """scikit-image's full map, as DSSIM averaged over channels: (C, H, W) -> (H, W)."""
    _, full = structural_similarity(x.astype(np.float64), y.astype(np.float64), data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True,
                                    channel_axis=0)
    return ((1 - full) / 2).mean(axis=0)


def _pair(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(1, C, H, W) float32 image and a distorted copy: noise plus a bright patch."""
    x = image.astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.03, x.shape), 0, 1).astype(np.float32)
    h, w = x.shape[-2:]
    y[..., h // 3:h // 3 + h // 8, w // 2:w // 2 + w // 6] = 0.95
    return x[None], y[None]


REAL = {
    "brick": lambda: skimage.data.brick()[None] / 255.0,
    "grass": lambda: skimage.data.grass()[None] / 255.0,
    "camera": lambda: skimage.data.camera()[None] / 255.0,
    "astronaut": lambda: skimage.data.astronaut().transpose(2, 0, 1) / 255.0,
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_images(arrays, name):
    x, y = _pair(REAL[name](), np.random.default_rng(0))
    result = kernels.dssim_map(arrays.put(x), arrays.put(y), out=arrays.empty(x.shape[:1] + x.shape[2:], np.float32))
    got = arrays.get(result.map)
    np.testing.assert_allclose(got, _reference(x, y), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0], _skimage(x[0], y[0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 128, 128), (17, 1, 33, 47), (17, 3, 21, 19), (1, 3, 6, 300),
                                   (2, 1, 5, 5), (3, 1, 300, 257)])
def test_random_images_and_odd_sizes(arrays, shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape, dtype=np.float32)
    y = rng.random(shape, dtype=np.float32)
    n, _, h, w = shape
    result = kernels.dssim_map(arrays.put(x), arrays.put(y), out=arrays.empty((n, h, w), np.float32))
    got = arrays.get(result.map)
    np.testing.assert_allclose(got, _reference(x, y), rtol=0, atol=1e-5)
    for i in (0, n - 1) if min(h, w) >= 7 else ():  # scikit-image refuses images under 7x7
        np.testing.assert_allclose(got[i], _skimage(x[i], y[i]), rtol=0, atol=1e-4)


def test_identical_images_give_zero(arrays):
    x = (skimage.data.brick()[None, None] / 255.0).astype(np.float32)
    got = arrays.get(kernels.dssim_map(arrays.put(x), arrays.put(x), out=arrays.empty((1, 512, 512), np.float32)).map)
    assert np.abs(got).max() < 1e-6


# windows 29 and 31 need over 48 KiB of shared memory per block on CUDA (the opt-in)
@pytest.mark.parametrize("window,sigma,data_range", [(7, 1.0, 1.0), (11, 1.5, 255.0), (21, 3.0, 1.0), (3, 0.5, 2.0),
                                                     (29, 4.0, 1.0), (31, 5.0, 1.0)])
def test_window_sigma_and_data_range(arrays, window, sigma, data_range):
    rng = np.random.default_rng(window)
    x = (rng.random((2, 2, 40, 37)) * data_range).astype(np.float32)
    y = (rng.random((2, 2, 40, 37)) * data_range).astype(np.float32)
    got = arrays.get(kernels.dssim_map(arrays.put(x), arrays.put(y), window=window, sigma=sigma,
                                       data_range=data_range, out=arrays.empty((2, 40, 37), np.float32)).map)
    np.testing.assert_allclose(got, _reference(x, y, data_range=data_range, window=window, sigma=sigma),
                               rtol=0, atol=1e-5)


def test_mask_and_statistics_in_the_same_pass(arrays):
    x, y = _pair(skimage.data.camera()[None] / 255.0, np.random.default_rng(1))
    x, y = np.concatenate([x, y]), np.concatenate([y, y])  # the second pair is identical
    threshold = 0.2
    result = kernels.dssim_map(arrays.put(x), arrays.put(y), threshold=threshold, stats=True,
                               out=arrays.empty((2, 512, 512), np.float32), mask=arrays.empty((2, 512, 512), np.uint8),
                               max=arrays.empty((2,), np.float32), mean=arrays.empty((2,), np.float32))
    dssim = arrays.get(result.map)
    np.testing.assert_array_equal(arrays.get(result.mask), (dssim > threshold).astype(np.uint8))
    assert arrays.get(result.mask)[0].sum() > 1000 and arrays.get(result.mask)[1].sum() == 0
    np.testing.assert_array_equal(arrays.get(result.max), dssim.reshape(2, -1).max(axis=1))
    np.testing.assert_allclose(arrays.get(result.mean), dssim.reshape(2, -1).astype(np.float64).mean(axis=1),
                               rtol=1e-6)


def test_empty_batch(arrays):
    x = np.zeros((0, 1, 16, 16), np.float32)
    result = kernels.dssim_map(arrays.put(x), arrays.put(x), stats=True, out=arrays.empty((0, 16, 16), np.float32),
                               max=arrays.empty((0,), np.float32), mean=arrays.empty((0,), np.float32))
    assert arrays.get(result.map).shape == (0, 16, 16)


@pytest.mark.parametrize("shape", [(2, 1, 33, 513), (1, 2, 65, 256), (3, 1, 17, 255), (1, 1, 97, 257)])
def test_cpu_thread_count_and_tiles_do_not_change_the_bits(shape):
    """The C++ kernel tiles 256 columns by up to 32 rows and shares the tiles
    among OpenMP threads: sizes on both sides of a tile edge, 1 to 3 threads."""
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape, dtype=np.float32)
    y = rng.random(shape, dtype=np.float32)
    results = [kernels.dssim_map(x, y, threshold=0.3, stats=True, threads=t) for t in (1, 2, 3)]
    for other in results[1:]:
        for name in ("map", "mask", "max", "mean"):
            np.testing.assert_array_equal(getattr(other, name), getattr(results[0], name))
    np.testing.assert_allclose(results[0].map, _reference(x, y), rtol=0, atol=1e-5)


@pytest.mark.skipif(not kernels.build_info()["cpu_avx2"], reason="no AVX2 variant on this machine")
def test_avx2_and_baseline_variants_agree_bit_for_bit(tmp_path):
    code = ("import numpy as np, sys, eproj.cpp_ext as k; r = np.random.default_rng(3); "
            "x = r.random((3, 3, 45, 301), dtype=np.float32); y = r.random((3, 3, 45, 301), dtype=np.float32); "
            "np.save(sys.argv[1], k.dssim_map(x, y).map)")
    for name, off in (("avx2", "0"), ("baseline", "1")):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True,
                       env={**os.environ, "EPROJ_DISABLE_AVX2": off})
    np.testing.assert_array_equal(np.load(tmp_path / "avx2.npy"), np.load(tmp_path / "baseline.npy"))


def test_bad_arguments_are_named():
    x = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    with pytest.raises(ArrayError, match=r"y: expected shape \(2, 1, 16, 16\), got \(2, 1, 16, 15\)"):
        kernels.dssim_map(x, x[..., :15].copy())
    with pytest.raises(ArrayError, match="x: expected dtype float32, got float64"):
        kernels.dssim_map(x.astype(np.float64), x)
    with pytest.raises(ArrayError, match=r"x: expected a batch \(N, C, H, W\), got shape \(16, 16\)"):
        kernels.dssim_map(x[0, 0], x[0, 0])
    with pytest.raises(ArrayError, match="y: expected a C-contiguous array"):
        kernels.dssim_map(x, x.transpose(0, 1, 3, 2))
    with pytest.raises(ArrayError, match="smaller than the window radius 5"):
        kernels.dssim_map(x[..., :4, :4].copy(), x[..., :4, :4].copy())
    with pytest.raises(ConfigError, match="window must be an odd integer"):
        kernels.dssim_map(x, x, window=12)
    with pytest.raises(ConfigError, match="a mask output needs a threshold"):
        kernels.dssim_map(x, x, mask=np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(ArrayError, match=r"out: expected shape \(2, 16, 16\)"):
        kernels.dssim_map(x, x, out=np.zeros((2, 16), np.float32))
    with pytest.raises(ArrayError, match="out and x are the same memory"):
        flat = np.zeros((2, 1, 16, 16), np.float32)
        kernels.dssim_map(flat, x, out=flat.reshape(2, 16, 16))
    with pytest.raises(ArrayError, match=HOST_POINTER_AS_DEVICE):
        kernels.dssim_map(kernels.device_array(x.ctypes.data, x.shape), x)


def test_why_the_moments_are_centred():
    """E[x^2] - E[x]^2 in float32 misses the 1e-5 tolerance on a photograph's flat
    regions; the kernel's centred sums (law of total variance) meet it."""
    x, y = _pair(skimage.data.camera()[None] / 255.0, np.random.default_rng(0))
    truth = _reference(x, y)
    naive = reference_dssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()  # the reference in float32
    assert np.abs(naive - truth).max() > 1e-5
    assert np.abs(kernels.dssim_map(x, y).map - truth).max() < 1e-6
