"""PyTorch: the exported step module (eproj.export.step, forward operators only,
no autograd) on the CPU or on CUDA. On CUDA every iteration (step module, stop
check, update) is captured in one CUDA graph after a warm-up and replayed; if
capture fails, it falls back to plain launches and says so."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu", cuda_graphs: bool = True):
        super().__init__(bundle)
        try:
            import torch
        except ImportError:
            raise ConfigError("the torch backend needs PyTorch: pip install torch") from None
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"torch device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("torch has no CUDA here (a CPU build, or no GPU)")
        from eproj.export.step import StepModule
        from eproj.train.checkpoint import load_model

        self._torch = torch
        self.device = device
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self.captured = False
        self.kernel_threads = 1  # torch's OpenMP threads spin between ops, like ONNX Runtime's
        self.module = StepModule(load_model(bundle.weights_path).model).to(device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        if device == "cuda":
            self._stream = torch.cuda.Stream()
            self.stream = self._stream.cuda_stream

    def _on_stream(self) -> Any:
        import contextlib

        return self._torch.cuda.stream(self._stream) if self.device == "cuda" else contextlib.nullcontext()

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self._torch.empty(shape, dtype=getattr(self._torch, dtype), device=self.device)

    def upload(self, dst: Any, host: np.ndarray) -> None:
        with self._on_stream():
            dst.copy_(self._torch.from_numpy(np.ascontiguousarray(host)), non_blocking=False)

    def download(self, src: Any) -> np.ndarray:
        self.synchronize()
        return src.detach().cpu().numpy().copy()

    def synchronize(self) -> None:
        if self.device == "cuda":
            self._stream.synchronize()

    def prepare_step(self, x: Any, reconstruction: Any, loss: Any, grad: Any) -> Callable[[], None]:
        module, torch = self.module, self._torch

        def step() -> None:
            with torch.no_grad(), self._on_stream():
                out = module(x)
                reconstruction.copy_(out[0])
                loss.copy_(out[1])
                grad.copy_(out[2])

        return step

    def capture(self, iteration: Callable[[], None]) -> Callable[[], None]:
        if not self.cuda_graphs:
            return iteration
        torch = self._torch
        try:
            with self._on_stream():
                for _ in range(3):  # warm-up: allocator pools, cuDNN algorithm choice
                    iteration()
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                iteration()
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed ({error}); running plain launches", RuntimeWarning,
                          stacklevel=2)
            return iteration
        self.captured = True

        def replay() -> None:
            with self._on_stream():
                graph.replay()

        replay.graph = graph  # type: ignore[attr-defined]
        return replay

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        return f"torch ({self.device}{graphs})"
