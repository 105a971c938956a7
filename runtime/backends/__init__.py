"""The runtime's inference backends, one module each, all subclasses of
``eproj.runtime.backends.base.Backend``:

- ``onnxruntime``: ONNX Runtime, CPU provider (the embedded default) or CUDA;
- ``torch``: the bundle's ``torch.export``-ed step program on the CPU or CUDA, with CUDA graphs;
- ``tensorrt``: TensorRT engines through cuda-python, with CUDA graphs;
- ``openvino``: OpenVINO's CPU plugin, f32 (an optional extra, ``eproj[openvino]``).

``create_backend(bundle, "auto", device)`` picks, among the backends that can run on
``device`` and take every option given, TensorRT, then torch on CUDA, then ONNX
Runtime (on the CPU unless ``device="cuda"``), then OpenVINO, then torch on the CPU,
and records why it passed over the others. No option is ever dropped: an option the
named backend does not take is a ``ConfigError`` naming the option and the backend.

OpenVINO comes after ONNX Runtime on the CPU because it was measured slower where
the runtime spends its time (``benchmarks/results/full_frame_cpu.json``: 2 shared cores
of an AMD EPYC with AVX-512 and no AMX, OpenVINO 2026.4 against ONNX Runtime 1.32). The
runtime splits batches across one-thread loops, and there OpenVINO's step took 1.2x ONNX
Runtime's time (batch 1 and 16); a full 1024 x 1024 frame ran at 0.83-0.85x the frames/s
under the bundle's stop rule and at the same frames/s at 100 iterations. OpenVINO was
faster only with two threads on one batch-16 call (1.19x).
"""

from __future__ import annotations

from typing import Any

from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt", "openvino")
DEVICES = ("cpu", "cuda")
# the options each backend takes besides its device
OPTIONS = {"onnxruntime": ("threads", "precision", "loops"), "torch": ("cuda_graphs",),
           "tensorrt": ("precision", "cuda_graphs"), "openvino": ("threads", "loops")}
# what "auto" tries, in order, for each device asked for (None: any)
_AUTO_ORDER = {None: (("tensorrt", "cuda"), ("torch", "cuda"), ("onnxruntime", "cpu"), ("openvino", "cpu"),
                      ("torch", "cpu")),
               "cuda": (("tensorrt", "cuda"), ("torch", "cuda"), ("onnxruntime", "cuda")),
               "cpu": (("onnxruntime", "cpu"), ("openvino", "cpu"), ("torch", "cpu"))}


def _unavailable(bundle: Bundle, backend: str, device: str, precision: str | None) -> str:
    """Why ``backend`` on ``device`` cannot run here, found without building it ("" if it may).
    On cuda the loop also needs the fused CUDA kernels, which a C++-only build lacks."""
    reason = _backend_unavailable(bundle, backend, device, precision)
    if reason or device != "cuda":
        return reason
    from eproj.cpp_ext import cuda_unavailable_reason

    kernels = cuda_unavailable_reason()
    return f"the fused CUDA kernels cannot run: {kernels}" if kernels else ""


def _backend_unavailable(bundle: Bundle, backend: str, device: str, precision: str | None) -> str:
    import importlib.util

    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed"
        engine = "step_fp16" if precision == "fp16" else "step"
        if engine not in bundle.manifest.get("engines", {}):
            return f"no {engine}.engine recorded in {bundle.folder} (eproj build-engine" + \
                (" --fp16)" if precision == "fp16" else ")")
        return ""
    if backend == "torch":
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "torch has no CUDA device"
        if "torch_step" not in bundle.manifest:
            return "the bundle carries no torch step program (export it again with this eproj)"
        return ""
    if backend == "openvino":
        missing = [name for name in ("openvino", "onnx") if importlib.util.find_spec(name) is None]
        return f"{' and '.join(missing)} not installed (pip install openvino onnx)" if missing else ""
    if importlib.util.find_spec("onnxruntime") is None:
        return "ONNX Runtime is not installed"
    return ""


def _refused_options(backend: str, options: dict[str, Any]) -> list[str]:
    return [f"{name}={value!r}" for name, value in options.items() if name not in OPTIONS[backend]]


def _build(bundle: Bundle, backend: str, device: str | None, options: dict[str, Any]) -> Backend:
    refused = _refused_options(backend, options)
    if refused:
        raise ConfigError(f"the {backend} backend does not take {', '.join(refused)} "
                          f"(it takes: {', '.join(OPTIONS[backend]) or 'no options'}, and a device)")
    if backend == "onnxruntime":
        from eproj.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device or "cpu", **options)
    if backend == "torch":
        from eproj.runtime.backends.torch import TorchBackend

        return TorchBackend(bundle, device or "cpu", **options)
    if backend == "openvino":
        from eproj.runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(bundle, device or "cpu", **options)
    if device not in (None, "cuda"):
        raise ConfigError(f"the tensorrt backend runs on cuda, not {device!r}")
    from eproj.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(bundle, **options)


def create_backend(bundle: Bundle, backend: str = "auto", device: str | None = None,
                   **options: Any) -> tuple[Backend, str]:
    """The backend named (or picked, for "auto") and a line saying what was chosen and why.

    ``options`` whose value is None count as not given; every other one must be taken
    by the backend (``OPTIONS``), or it is a ConfigError (for "auto": the backends that
    do not take it are passed over).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device not in (None, *DEVICES):
        raise ConfigError(f"device must be one of {DEVICES} (or None for any), got {device!r}")
    given = {name: value for name, value in options.items() if value is not None}
    unknown = sorted(set(given) - {name for names in OPTIONS.values() for name in names})
    if unknown:
        raise ConfigError(f"unknown backend option(s) {unknown}; known: "
                          f"{sorted({n for names in OPTIONS.values() for n in names})}")
    if backend != "auto":
        chosen = _build(bundle, backend, device, given)
        return chosen, f"{chosen.describe()}, as asked"
    passed: list[str] = []
    for name, where in _AUTO_ORDER[device]:
        label = f"{name} on {where}"
        refused = _refused_options(name, given)
        reason = f"does not take {', '.join(refused)}" if refused else _unavailable(bundle, name, where, given.get("precision"))
        if not reason:
            try:
                chosen = _build(bundle, name, where, given)
            except Exception as error:  # a broken GPU setup must not stop the fallbacks
                reason = f"{type(error).__name__}: {error}"
            else:
                note = f"auto: picked {label}" + (f"; passed over {'; '.join(passed)}" if passed else "")
                return chosen, note
        passed.append(f"{label} ({reason})")
    asked = f" on {device}" if device else ""
    raise ConfigError(f"no backend can run this bundle{asked} here: {'; '.join(passed)}")
