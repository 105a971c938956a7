"""The fused update against the reference eproj.train.projection.update_step.

Tolerance: x, m, v within 1e-6 absolute (the C++ kernel is bit-exact on x86-64;
CUDA may contract multiply-adds), distance and energy within 1e-5 relative (the
kernels sum in double, the reference in float32).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import eproj.cpp_ext as kernels
from eproj.config import ProjectionConfig
from eproj.errors import ArrayError, ConfigError
from eproj.train.projection import update_step

# a host pointer passed as device memory: the CUDA build names it; a build without the CUDA
# kernels (the default pip install) cannot tell, and refuses every CUDA array, saying why
HOST_POINTER_AS_DEVICE = ("x: expected device memory" if kernels.build_info()["cuda"] else
                          "x is a CUDA array, but the CUDA kernels cannot run here: eproj was built without CUDA")


def _state(rng, n=5, c=1, h=13, w=17, mask_channels=None):
    x0 = rng.random((n, c, h, w), dtype=np.float32)
    s = {
        "x": np.clip(x0 + rng.normal(0, 0.1, x0.shape), 0, 1).astype(np.float32),
        "x0": x0,
        "reconstruction": rng.random(x0.shape, dtype=np.float32),
        "grad_lr": rng.normal(0, 2, x0.shape).astype(np.float32),
        "loss": rng.random(n, dtype=np.float32) * 10,
        "active": np.array([i % 3 != 1 for i in range(n)], dtype=bool),
        "iterations": rng.integers(0, 6, n).astype(np.int32),
    }
    if n:
        s["x"][0, 0, 0, :3] = x0[0, 0, 0, :3]  # sign(0) on a few pixels
    if mask_channels is not None:
        s["mask"] = (rng.random((n, mask_channels, h, w)) > 0.5).astype(np.float32)
    return s


def _reference(s, config, m=None, v=None):
    t = {k: torch.from_numpy(np.asarray(val)) for k, val in s.items()}
    return update_step(t["x"], t["x0"], t["reconstruction"], t["grad_lr"], t["loss"], t["active"],
                       t["iterations"].long(), config, t.get("mask"),
                       None if m is None else torch.from_numpy(m), None if v is None else torch.from_numpy(v))


CASES = [("hadamard", "plain", None), ("none", "plain", None), ("mask", "plain", 1), ("mask", "plain", 3),
         ("hadamard", "adam", None), ("none", "adam", None), ("mask", "adam", 1)]


@pytest.mark.parametrize("weighting,step,mask_channels", CASES)
@pytest.mark.parametrize("shape", [(5, 1, 13, 17), (17, 3, 8, 9), (1, 1, 64, 64)])
def test_update_matches_the_reference(arrays, weighting, step, mask_channels, shape):
    rng = np.random.default_rng(zlib.crc32(repr((weighting, step, mask_channels, shape)).encode()))
    n, c, h, w = shape
    if mask_channels == 3 and c != 3:
        pytest.skip("per-channel mask needs 3 channels")
    s = _state(rng, n, c, h, w, mask_channels)
    config = ProjectionConfig(alpha=0.5 if step == "plain" else 0.01, lam=0.05, weighting=weighting, step=step,
                              value_min=0.0, value_max=1.0)
    m = np.zeros_like(s["x"]) if step == "adam" else None
    v = np.zeros_like(s["x"]) if step == "adam" else None
    dev = {k: arrays.put(val) for k, val in s.items()}
    dm = arrays.put(m) if m is not None else None
    dv = arrays.put(v) if v is not None else None
    for _ in range(3):  # three steps: Adam's moments and the per-sample counts evolve
        ref = _reference(s, config, m, v)
        distance, energy = kernels.update(
            dev["x"], dev["x0"], dev["reconstruction"], dev["grad_lr"], dev["loss"], dev["active"],
            dev["iterations"], config=config, mask=dev.get("mask"), m=dm, v=dv,
            distance=arrays.empty((n,), np.float32), energy=arrays.empty((n,), np.float32))
        x = arrays.get(dev["x"])
        np.testing.assert_allclose(x, ref.x.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(arrays.get(distance), ref.distance.numpy(), rtol=1e-5)
        np.testing.assert_allclose(arrays.get(energy), ref.energy.numpy(), rtol=1e-5)
        np.testing.assert_array_equal(arrays.get(dev["iterations"]), ref.iterations.numpy())
        inactive = ~s["active"]
        np.testing.assert_array_equal(x[inactive], s["x"][inactive])  # untouched, bit for bit
        if step == "adam":
            np.testing.assert_allclose(arrays.get(dm), ref.m.numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(arrays.get(dv), ref.v.numpy(), rtol=1e-6, atol=1e-9)
            m, v = arrays.get(dm).copy(), arrays.get(dv).copy()
            assert not m[inactive].any()
        # the next step starts from the kernel's state, as the loop would
        s["x"] = x.copy()
        s["iterations"] = arrays.get(dev["iterations"]).copy()
        s["reconstruction"] = rng.random(x.shape, dtype=np.float32)
        dev["reconstruction"] = arrays.put(s["reconstruction"])


# the C++ kernel works in chunks of 16384 pixels of one channel, over two or more
# OpenMP threads from 32768 pixels on: one chunk exactly, one pixel over, just
# under two, and three chunks
CHUNK_SHAPES = [(3, 2, 128, 128), (3, 1, 129, 128), (2, 1, 181, 181), (1, 1, 1, 32769)]


@pytest.mark.parametrize("shape", CHUNK_SHAPES)
def test_sizes_across_the_cpu_chunks(arrays, shape):
    rng = np.random.default_rng(sum(shape))
    n, c, h, w = shape
    s = _state(rng, n, c, h, w, mask_channels=1)
    config = ProjectionConfig(alpha=0.01, lam=0.05, weighting="mask", step="adam", value_min=0.0, value_max=1.0)
    m, v = np.zeros_like(s["x"]), np.zeros_like(s["x"])
    ref = _reference(s, config, m, v)
    dev = {k: arrays.put(val) for k, val in s.items()}
    distance, energy = kernels.update(
        dev["x"], dev["x0"], dev["reconstruction"], dev["grad_lr"], dev["loss"], dev["active"], dev["iterations"],
        config=config, mask=dev["mask"], m=arrays.put(m), v=arrays.put(v), distance=arrays.empty((n,), np.float32),
        energy=arrays.empty((n,), np.float32), threads=2)
    np.testing.assert_allclose(arrays.get(dev["x"]), ref.x.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays.get(distance), ref.distance.numpy(), rtol=1e-5)
    np.testing.assert_allclose(arrays.get(energy), ref.energy.numpy(), rtol=1e-5)


@pytest.mark.parametrize("shape", CHUNK_SHAPES)
def test_cpu_thread_count_does_not_change_the_bits(shape):
    s = _state(np.random.default_rng(3), *shape)
    results = []
    for threads in (1, 2, 3):
        t = {k: np.array(val, copy=True) for k, val in s.items()}
        distance, energy = kernels.update(t["x"], t["x0"], t["reconstruction"], t["grad_lr"], t["loss"], t["active"],
                                          t["iterations"], threads=threads)
        results.append((t["x"], distance, energy))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_cpu_update_is_bit_exact(device):
    if device != "cpu":
        pytest.skip("bit-exactness is a property of the C++ kernel")
    s = _state(np.random.default_rng(7), 4, 2, 31, 29)
    config = ProjectionConfig()
    ref = _reference(s, config)
    kernels.update(s["x"], s["x0"], s["reconstruction"], s["grad_lr"], s["loss"], s["active"], s["iterations"],
                   config=config)
    np.testing.assert_array_equal(s["x"], ref.x.numpy())


def test_empty_batch(arrays):
    s = _state(np.random.default_rng(0), n=0)
    dev = {k: arrays.put(val) for k, val in s.items()}
    distance, energy = kernels.update(dev["x"], dev["x0"], dev["reconstruction"], dev["grad_lr"], dev["loss"],
                                      dev["active"], dev["iterations"], distance=arrays.empty((0,), np.float32),
                                      energy=arrays.empty((0,), np.float32))
    assert arrays.get(distance).shape == (0,) and arrays.get(energy).shape == (0,)


def _call(s, **changes):
    args = dict(s)
    config = changes.pop("config", ProjectionConfig())
    extra = {k: changes.pop(k) for k in ("mask", "m", "v", "distance", "energy") if k in changes}
    args.update(changes)
    args.pop("mask", None)
    return kernels.update(args["x"], args["x0"], args["reconstruction"], args["grad_lr"], args["loss"],
                          args["active"], args["iterations"], config=config, **extra)


@pytest.mark.parametrize("change,message", [
    (lambda s: {"x": s["x"].astype(np.float64)}, "x: expected dtype float32, got float64"),
    (lambda s: {"x0": s["x0"][:, :, :, :-1]}, r"x0: expected shape \(5, 1, 13, 17\), got \(5, 1, 13, 16\)"),
    (lambda s: {"grad_lr": np.asfortranarray(s["grad_lr"])}, "grad_lr: expected a C-contiguous array"),
    (lambda s: {"x": s["x"][:, :, :, ::-1]}, "x: expected a C-contiguous array"),
    (lambda s: {"x": s["x"][0]}, r"x: expected a batch \(N, C, H, W\), got shape \(1, 13, 17\)"),
    (lambda s: {"loss": s["loss"][:2]}, r"loss: expected shape \(5,\), got \(2,\)"),
    (lambda s: {"active": s["active"].astype(np.float32)}, "active: expected dtype bool or uint8, got float32"),
    (lambda s: {"iterations": s["iterations"].astype(np.int64)}, "iterations: expected dtype int32, got int64"),
    (lambda s: {"x0": s["x"]}, "x and x0 are the same memory"),
    (lambda s: {"x": [1, 2, 3]}, "x: expected a NumPy array or a CUDA array"),
    (lambda s: {"x": kernels.device_array(s["x"].ctypes.data, s["x"].shape)}, HOST_POINTER_AS_DEVICE),
])
def test_bad_arguments_are_named(change, message):
    s = _state(np.random.default_rng(0))
    with pytest.raises(ArrayError, match=message):
        _call(s, **change(s))


def test_read_only_output_and_mode_mismatches():
    s = _state(np.random.default_rng(0), mask_channels=1)
    frozen = s["x"].copy()
    frozen.flags.writeable = False
    with pytest.raises(ArrayError, match="x: the kernel writes into it, but it is read-only"):
        _call(s, x=frozen)
    with pytest.raises(ConfigError, match="a mask is needed exactly when weighting='mask'"):
        _call(s, config=ProjectionConfig(weighting="mask"))
    with pytest.raises(ConfigError, match="a mask is needed exactly when weighting='mask'"):
        _call(s, mask=s["mask"])
    with pytest.raises(ArrayError, match=r"mask: expected shape \(5, 1, 13, 17\)"):
        _call(s, config=ProjectionConfig(weighting="mask"), mask=s["mask"][:, :, :4])
    with pytest.raises(ConfigError, match="step='adam' needs the moment buffer m"):
        _call(s, config=ProjectionConfig(step="adam"))
    with pytest.raises(ConfigError, match="belong to step='adam'"):
        _call(s, m=np.zeros_like(s["x"]), v=np.zeros_like(s["x"]))
    with pytest.raises(ArrayError, match=r"distance: expected shape \(5,\)"):
        _call(s, distance=np.zeros(4, np.float32))


def test_a_prepared_update_repeats_the_same_steps(arrays):
    s = _state(np.random.default_rng(11), 3, 1, 20, 20)
    config = ProjectionConfig(step="adam", alpha=0.01)
    results = []
    for prepared in (False, True):
        dev = {k: arrays.put(val) for k, val in s.items()}
        m, v = arrays.put(np.zeros_like(s["x"])), arrays.put(np.zeros_like(s["x"]))
        out = (arrays.empty((3,), np.float32), arrays.empty((3,), np.float32))
        args = (dev["x"], dev["x0"], dev["reconstruction"], dev["grad_lr"], dev["loss"], dev["active"],
                dev["iterations"])
        kw = dict(config=config, m=m, v=v, distance=out[0], energy=out[1])
        call = kernels.prepare_update(*args, **kw) if prepared else (lambda: kernels.update(*args, **kw))
        for _ in range(4):
            distance, energy = call()
        results.append((arrays.get(dev["x"]), arrays.get(dev["iterations"]), arrays.get(distance)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
