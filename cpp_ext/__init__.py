"""The fused kernels of the projection loop, in C++ (always) and CUDA (when built).

- ``update``: one Hadamard-weighted (or masked, or unweighted) plain or Adam
  step of the projection for every active sample, in place, in one pass over
  the pixels; it returns per sample ||x_new - x0||_1 and the energy.
- ``stop_check``: each sample's stop decision on the current iterate (Lr under
  the stop threshold, or the energy no longer changing), kept in device arrays
  so the loop never has to read it back to continue;
- ``dssim_map``: the per-pixel DSSIM map, optionally with its mask at a
  threshold and each image's max and mean, in one pass.

Semantics are those of the plain reference, ``eproj.train.projection.update_step``,
``eproj.train.projection.stop_check`` and ``eproj.train.losses.dssim_map``;
tests hold the kernels to them.

NumPy arrays run on the CPU kernels. CUDA arrays (anything with
``__cuda_array_interface__`` or DLPack: CuPy, torch, pycuda, Numba, JAX; raw
pointers through ``device_array``) run on the CUDA kernels, launched on
``stream`` and never synchronised here. Results of CUDA calls go into the
output arrays the caller passes; the CPU path allocates them when not given.

``prepare_update`` and ``prepare_dssim_map`` check the arguments once and
return a call that launches the kernel again on the same buffers, for loops.

The calls hold no global state and release the GIL: concurrent calls on
different arrays are safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from eproj.config import ProjectionConfig
from eproj.cpp_ext._arrays import ArrayView, DeviceArray, device_array, stream_handle, view_of
from eproj.errors import ArrayError, ConfigError

__all__ = ["update", "dssim_map", "stop_check", "prepare_update", "prepare_dssim_map", "prepare_stop_check", "PreparedCall", "DssimResult", "device_array", "DeviceArray", "build_info", "cuda_available",
           "cuda_unavailable_reason", "cuda_synchronize", "MAX_WINDOW"]

MAX_WINDOW = 31
_WEIGHTING_CODES = {"hadamard": 0, "mask": 1, "none": 2}
_STEP_CODES = {"plain": 0, "adam": 1}
_module: ModuleType | None = None


def _load() -> ModuleType:
    """The compiled module, imported on first use. Every call goes through
    ``_module``: the tests set it to ``eproj.cpp_ext._kernels_sim``, the same
    bindings with the CUDA kernels on a simulated device (cpp_ext/README.md)."""
    global _module
    if _module is None:
        try:
            from eproj.cpp_ext import _kernels
        except ImportError as error:
            raise ImportError("eproj's compiled kernels (eproj.cpp_ext._kernels) are missing: reinstall eproj "
                              f"from source so that they are built (pip install .); {error}") from error
        _module = _kernels
    return _module


def build_info() -> dict[str, Any]:
    """What the installed build contains: compiler, OpenMP and thread count,
    CUDA version and architectures (``cuda`` False when built without)."""
    return dict(_load().build_info())


def cuda_unavailable_reason() -> str:
    """Empty when the CUDA kernels can run here, otherwise why not."""
    reason = str(_load().cuda_unavailable_reason())
    if reason and not _load().build_info()["cuda"]:
        reason += " (the default build is C++ only; build them with pip install . -Ccmake.define.EPROJ_CUDA=ON)"
    return reason


def cuda_available() -> bool:
    return cuda_unavailable_reason() == ""


def cuda_synchronize() -> None:
    """Wait for all work queued on the current CUDA device."""
    _load().cuda_synchronize()


# ---------------------------------------------------------------------------
# argument checks, shared by both kernels
# ---------------------------------------------------------------------------

def _expect(view: ArrayView, shape: tuple[int, ...], dtypes: tuple[str, ...], writable: bool = False) -> None:
    if view.dtype not in dtypes:
        raise ArrayError(f"{view.name}: expected dtype {' or '.join(dtypes)}, got {view.dtype}")
    if view.shape != shape:
        raise ArrayError(f"{view.name}: expected shape {shape}, got {view.shape}")
    if not view.contiguous:
        raise ArrayError(f"{view.name}: expected a C-contiguous array, got a strided view "
                         "(copy it, e.g. np.ascontiguousarray)")
    if writable and view.readonly:
        raise ArrayError(f"{view.name}: the kernel writes into it, but it is read-only")


def _same_device(views: list[ArrayView]) -> str:
    first = views[0]
    for view in views[1:]:
        if (view.device, view.device_id) != (first.device, first.device_id):
            raise ArrayError(f"all arrays must be on one device: {first.name} is {first.describe()}, "
                             f"{view.name} is {view.describe()}")
    if first.device == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise ArrayError(f"{first.name} is a CUDA array, but the CUDA kernels cannot run here: {reason}")
    return first.device


def _images(view: ArrayView) -> tuple[int, int, int, int]:
    if len(view.shape) != 4:
        raise ArrayError(f"{view.name}: expected a batch (N, C, H, W), got shape {view.shape}")
    if view.dtype != "float32":
        raise ArrayError(f"{view.name}: expected dtype float32, got {view.dtype}")
    n, c, h, w = view.shape
    return n, c, h, w


def _output(given: Any, name: str, shape: tuple[int, ...], dtype: str, device: str) -> Any:
    """The caller's output array, or a new NumPy one on the CPU path."""
    if given is not None:
        return given
    if device == "cuda":
        raise ArrayError(f"{name}: on the CUDA path pass an output array ({dtype} {shape} on the GPU); "
                         "the kernels do not allocate device memory for results")
    return np.empty(shape, dtype=dtype)


def _distinct(out: ArrayView, inputs: list[ArrayView]) -> None:
    for view in inputs:
        if view.pointer == out.pointer and view.size and out.size:
            raise ArrayError(f"{out.name} and {view.name} are the same memory; the kernel writes {out.name} "
                             f"while it reads {view.name}")


# ---------------------------------------------------------------------------
# update
# ---------------------------------------------------------------------------

class PreparedCall:
    """A kernel call whose arguments were checked once; calling it launches the
    kernel again on the same buffers, with a few microseconds of overhead.

    The projection loop calls the update on the same buffers every iteration:
    prepare it once, then call it. The arrays must stay alive and in place
    (write into them, do not rebind them) for as long as the call is used.
    """

    def __init__(self, function: Any, args: tuple, keep: list[Any], outputs: Any):
        self._function = function
        self._args = args
        self._keep = keep  # the arrays whose memory the pointers refer to
        self.outputs = outputs

    def __call__(self) -> Any:
        self._function(*self._args)
        return self.outputs


def update(x: Any, x0: Any, reconstruction: Any, grad_lr: Any, loss: Any, active: Any, iterations: Any, *,
           config: ProjectionConfig = ProjectionConfig(), mask: Any = None, m: Any = None, v: Any = None,
           distance: Any = None, energy: Any = None, stream: Any = None, threads: int = 0) -> tuple[Any, Any]:
    """One projection step for every active sample, in place; the fused kernel.

    Args:
        x: (N, C, H, W) float32, the current iterate; updated in place.
        x0: (N, C, H, W) float32, the observed images.
        reconstruction: (N, C, H, W) float32, f(x).
        grad_lr: (N, C, H, W) float32, grad_x Lr at x.
        loss: (N,) float32, Lr at x.
        active: (N,) bool or uint8; samples with 0 are left untouched.
        iterations: (N,) int32, steps taken so far; incremented for active samples
            (Adam's bias correction uses iterations + 1).
        config: alpha, lam, weighting, step, Adam's betas and eps, value range.
        mask: (N, 1 or C, H, W) float32 Omega, required for ``weighting="mask"``.
        m, v: (N, C, H, W) float32 Adam moments, zero at the start, required for
            ``step="adam"``; updated in place.
        distance, energy: (N,) float32 outputs; allocated on the CPU path when None.
        stream: CUDA stream for CUDA arrays (see ``stream_handle``); ignored on the CPU.
        threads: CPU threads (0: OpenMP's default). A caller whose own thread pool
            spins between calls, as ONNX Runtime's does, passes 1.
    Returns:
        (distance, energy): distance[i] = ||x_new_i - x0_i||_1 and
        energy[i] = loss[i] + lam ||x_i - x0_i||_1 at the x the step started from.
    """
    return prepare_update(x, x0, reconstruction, grad_lr, loss, active, iterations, config=config, mask=mask,
                          m=m, v=v, distance=distance, energy=energy, stream=stream, threads=threads)()


def prepare_update(x: Any, x0: Any, reconstruction: Any, grad_lr: Any, loss: Any, active: Any, iterations: Any, *,
                   config: ProjectionConfig = ProjectionConfig(), mask: Any = None, m: Any = None, v: Any = None,
                   distance: Any = None, energy: Any = None, stream: Any = None, threads: int = 0) -> PreparedCall:
    """``update`` checked once and ready to run again: the returned call returns (distance, energy)."""
    xv = view_of(x, "x")
    n, c, h, w = _images(xv)
    shape = (n, c, h, w)
    views = [xv]
    pointers: dict[str, int | None] = {"x": xv.pointer}
    _expect(xv, shape, ("float32",), writable=True)
    for name, obj in (("x0", x0), ("reconstruction", reconstruction), ("grad_lr", grad_lr)):
        view = view_of(obj, name)
        _expect(view, shape, ("float32",))
        _distinct(xv, [view])
        views.append(view)
        pointers[name] = view.pointer
    for name, obj, dtypes, writable in (("loss", loss, ("float32",), False), ("active", active, ("bool", "uint8"), False),
                                        ("iterations", iterations, ("int32",), True)):
        view = view_of(obj, name)
        _expect(view, (n,), dtypes, writable)
        views.append(view)
        pointers[name] = view.pointer

    if (mask is None) == (config.weighting == "mask"):
        raise ConfigError("a mask is needed exactly when weighting='mask' "
                          f"(weighting={config.weighting!r}, mask {'given' if mask is not None else 'missing'})")
    mask_channels = 0
    if mask is not None:
        view = view_of(mask, "mask")
        mask_channels = view.shape[1] if len(view.shape) == 4 and view.shape[1] in (1, c) else 1
        _expect(view, (n, mask_channels, h, w), ("float32",))
        views.append(view)
        pointers["mask"] = view.pointer
    if config.step == "adam":
        for name, obj in (("m", m), ("v", v)):
            if obj is None:
                raise ConfigError(f"step='adam' needs the moment buffer {name}: (N, C, H, W) float32, zeros at the start")
            view = view_of(obj, name)
            _expect(view, shape, ("float32",), writable=True)
            _distinct(view, [xv])
            views.append(view)
            pointers[name] = view.pointer
    elif m is not None or v is not None:
        raise ConfigError("the moment buffers m and v belong to step='adam'; the plain step takes none")

    device = _same_device(views)
    outputs = []
    for name, given in (("distance", distance), ("energy", energy)):
        array = _output(given, name, (n,), "float32", device)
        view = view_of(array, name)
        _expect(view, (n,), ("float32",), writable=True)
        if view.device != device:
            raise ArrayError(f"{name}: expected an array on the inputs' device ({xv.describe()}), "
                             f"got {view.describe()}")
        pointers[name] = view.pointer
        outputs.append(array)

    args = (device, pointers, n, c, h, w, mask_channels, config.alpha, config.lam,
            _WEIGHTING_CODES[config.weighting], _STEP_CODES[config.step], config.adam_beta1,
            config.adam_beta2, config.adam_eps, config.value_min, config.value_max,
            stream_handle(stream) if device == "cuda" else 0, xv.device_id, int(threads))
    keep = [x, x0, reconstruction, grad_lr, loss, active, iterations, mask, m, v, *outputs]
    return PreparedCall(_load().Update(*args), (), keep, (outputs[0], outputs[1]))


# ---------------------------------------------------------------------------
# stop_check
# ---------------------------------------------------------------------------

STOP_BUFFERS = (("loss", ("float32",), False), ("distance", ("float32",), False), ("iterations", ("int32",), False),
                ("active", ("bool", "uint8"), True), ("previous", ("float32",), True), ("reason", ("int32",), True),
                ("final_loss", ("float32",), True), ("final_energy", ("float32",), True))


def stop_check(loss: Any, distance: Any, iterations: Any, active: Any, previous: Any, reason: Any,
               final_loss: Any, final_energy: Any, *, config: ProjectionConfig = ProjectionConfig(),
               stream: Any = None) -> None:
    """The stop check of every sample on the current iterate, in place; all arrays (N,).

    With E = loss + lam * distance, an active sample records E and its loss in
    ``final_energy`` and ``final_loss``, then stops (``active`` to 0) when loss <=
    config.stop_threshold (``reason`` 1) or else, once it has taken a step
    (``iterations`` > 0), when |previous - E| <= energy_tol |previous| (``reason`` 2).
    ``previous`` becomes E for every sample. Reason codes index
    ``eproj.config.STOP_REASON_CODES``; 0 means still running or stopped at the cap.

    Args:
        loss: float32, Lr at the iterate. distance: float32, ||x - x0||_1 at the
            iterate (what ``update`` returns). iterations: int32, steps taken.
        active: bool or uint8. previous: float32, +inf at the start. reason: int32,
            0 at the start. final_loss, final_energy: float32.
    """
    prepare_stop_check(loss, distance, iterations, active, previous, reason, final_loss, final_energy,
                       config=config, stream=stream)()


def prepare_stop_check(loss: Any, distance: Any, iterations: Any, active: Any, previous: Any, reason: Any,
                       final_loss: Any, final_energy: Any, *, config: ProjectionConfig = ProjectionConfig(),
                       stream: Any = None) -> PreparedCall:
    """``stop_check`` checked once and ready to run again."""
    arrays = (loss, distance, iterations, active, previous, reason, final_loss, final_energy)
    views = [view_of(obj, name) for obj, (name, _, _) in zip(arrays, STOP_BUFFERS)]
    if len(views[0].shape) != 1:
        raise ArrayError(f"loss: expected shape (N,), got {views[0].shape}")
    n = views[0].shape[0]
    for view, (_, dtypes, writable) in zip(views, STOP_BUFFERS):
        _expect(view, (n,), dtypes, writable)
    device = _same_device(views)
    pointers = {view.name: view.pointer for view in views}
    threshold = config.stop_threshold
    args = (device, pointers, n, config.lam, threshold is not None, float(threshold or 0.0), config.energy_tol,
            stream_handle(stream) if device == "cuda" else 0, views[0].device_id)
    return PreparedCall(_load().StopCheck(*args), (), list(arrays), None)


# ---------------------------------------------------------------------------
# dssim_map
# ---------------------------------------------------------------------------

@dataclass
class DssimResult:
    """``map`` (N, H, W) float32 DSSIM; ``mask`` (N, H, W) uint8, 1 where map >
    threshold; ``max`` and ``mean`` (N,) float32 per image. Those not asked for are None."""

    map: Any
    mask: Any = None
    max: Any = None
    mean: Any = None


def dssim_map(x: Any, y: Any, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
              threshold: float | None = None, stats: bool = False, out: Any = None, mask: Any = None,
              max: Any = None, mean: Any = None, stream: Any = None, threads: int = 0) -> DssimResult:
    """DSSIM = (1 - SSIM) / 2 per pixel between two batches, averaged over channels.

    Gaussian window of ``window`` taps and ``sigma``, K1 = 0.01, K2 = 0.03,
    population covariances and mirrored borders (d c b a | a b c d), as
    ``eproj.train.losses.dssim_map`` and scikit-image's full SSIM map.

    Args:
        x, y: (N, C, H, W) float32 in [0, data_range]; H and W at least window // 2.
        threshold: also write the mask ``map > threshold``.
        stats: also compute each image's max and mean of the map.
        out, mask, max, mean: output arrays ((N, H, W) float32, (N, H, W) uint8,
            (N,) float32); required on the CUDA path for what is asked, allocated on the CPU.
        stream: CUDA stream for CUDA arrays.
        threads: CPU threads (0: OpenMP's default).
    Returns:
        a DssimResult.
    """
    return prepare_dssim_map(x, y, data_range=data_range, window=window, sigma=sigma, threshold=threshold,
                             stats=stats, out=out, mask=mask, max=max, mean=mean, stream=stream,
                             threads=threads)()


def prepare_dssim_map(x: Any, y: Any, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
                      threshold: float | None = None, stats: bool = False, out: Any = None, mask: Any = None,
                      max: Any = None, mean: Any = None, stream: Any = None, threads: int = 0) -> PreparedCall:
    """``dssim_map`` checked once and ready to run again: the returned call returns the DssimResult."""
    if not (isinstance(window, int) and 1 <= window <= MAX_WINDOW and window % 2 == 1):
        raise ConfigError(f"window must be an odd integer in [1, {MAX_WINDOW}], got {window!r}")
    if not sigma > 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    if not data_range > 0:
        raise ConfigError(f"data_range must be > 0, got {data_range}")
    xv, yv = view_of(x, "x"), view_of(y, "y")
    n, c, h, w = _images(xv)
    _expect(xv, (n, c, h, w), ("float32",))
    _expect(yv, (n, c, h, w), ("float32",))
    if n and (h < window // 2 or w < window // 2):
        raise ArrayError(f"x: images of {h}x{w} are smaller than the window radius {window // 2}")
    device = _same_device([xv, yv])
    result = DssimResult(map=_output(out, "out", (n, h, w), "float32", device))
    pointers: dict[str, int | None] = {"x": xv.pointer, "y": yv.pointer}
    wanted = [("out", result.map, (n, h, w), ("float32",))]
    if threshold is not None:
        result.mask = _output(mask, "mask", (n, h, w), "uint8", device)
        wanted.append(("mask", result.mask, (n, h, w), ("uint8", "bool")))
    elif mask is not None:
        raise ConfigError("a mask output needs a threshold")
    if stats:
        result.max = _output(max, "max", (n,), "float32", device)
        result.mean = _output(mean, "mean", (n,), "float32", device)
        wanted += [("max", result.max, (n,), ("float32",)), ("mean", result.mean, (n,), ("float32",))]
    elif max is not None or mean is not None:
        raise ConfigError("max and mean outputs need stats=True")
    for name, array, shape, dtypes in wanted:
        view = view_of(array, name)
        _expect(view, shape, dtypes, writable=True)
        if view.device != device:
            raise ArrayError(f"{name}: expected an array on the inputs' device ({xv.describe()}), got {view.describe()}")
        _distinct(view, [xv, yv])
        pointers[name] = view.pointer
    args = (device, pointers, n, c, h, w, window, float(sigma), float(data_range),
            float(threshold) if threshold is not None else 0.0,
            stream_handle(stream) if device == "cuda" else 0, xv.device_id, int(threads))
    return PreparedCall(_load().DssimMap(*args), (), [x, y], result)
