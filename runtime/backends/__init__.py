"""The runtime's inference backends, one module each, all subclasses of
``eproj.runtime.backends.base.Backend``:

- ``onnxruntime``: ONNX Runtime, CPU provider (the embedded default) or CUDA;
- ``torch``: the exported step module on the CPU or CUDA, with CUDA graphs;
- ``tensorrt``: TensorRT 10 engines through cuda-python, with CUDA graphs.

``create_backend(bundle, "auto")`` picks TensorRT, then torch on CUDA, then ONNX
Runtime on the CPU, and records why it passed over the others.
"""

from __future__ import annotations

from typing import Any

from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")


def _tensorrt_reason(bundle: Bundle) -> str:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if not (bundle.folder / "step.engine").is_file():
        return f"no step.engine in {bundle.folder} (eproj build-engine)"
    return ""


def _torch_cuda_reason(bundle: Bundle) -> str:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    if "weights" not in bundle.manifest:
        return "the bundle carries no weights"
    return ""


def create_backend(bundle: Bundle, backend: str = "auto", device: str | None = None,
                   **options: Any) -> tuple[Backend, str]:
    """The backend named (or picked, for "auto") and a line saying what was chosen and why."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        passed = []
        reason = _tensorrt_reason(bundle)
        if not reason:
            try:
                picked = create_backend(bundle, "tensorrt", **options)[0]
                return picked, "auto: picked tensorrt"
            except Exception as error:  # a broken GPU setup must not stop the CPU fallback
                reason = f"{type(error).__name__}: {error}"
        passed.append(f"tensorrt ({reason})")
        reason = _torch_cuda_reason(bundle)
        if not reason:
            try:
                picked = create_backend(bundle, "torch", "cuda", **options)[0]
                return picked, f"auto: picked torch on CUDA; passed over {'; '.join(passed)}"
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
        passed.append(f"torch-cuda ({reason})")
        picked = create_backend(bundle, "onnxruntime", "cpu", **options)[0]
        return picked, f"auto: picked onnxruntime on the CPU; passed over {'; '.join(passed)}"
    chosen: Backend
    if backend == "onnxruntime":
        from eproj.runtime.backends.onnxruntime import OnnxRuntimeBackend

        allowed = {k: v for k, v in options.items() if k in ("threads", "precision", "loops")}
        chosen = OnnxRuntimeBackend(bundle, device or "cpu", **allowed)
    elif backend == "torch":
        from eproj.runtime.backends.torch import TorchBackend

        allowed = {k: v for k, v in options.items() if k in ("cuda_graphs",)}
        chosen = TorchBackend(bundle, device or "cpu", **allowed)
    else:
        if device not in (None, "cuda"):
            raise ConfigError(f"the tensorrt backend runs on cuda, not {device!r}")
        from eproj.runtime.backends.tensorrt import TensorRTBackend

        allowed = {k: v for k, v in options.items() if k in ("precision", "cuda_graphs")}
        chosen = TensorRTBackend(bundle, **allowed)
    return chosen, f"{chosen.describe()}, as asked"
