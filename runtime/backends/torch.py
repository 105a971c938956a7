"""PyTorch: the bundle's step program (``step.pt2``, the step graph exported with
``torch.export``: forward operators only, no autograd, weights included) on the
CPU or on CUDA, and its forward program (``forward.pt2``, x -> reconstruction, Lr),
loaded when first asked for (for a bundle exported before it, the step program stands
in for it). It needs torch alone, not eproj's training or export code; a
program is loaded from the bytes whose hash was checked (``Bundle.file_bytes``), never
reopened by path. On CUDA every iteration (step
program, stop check, update) is captured in one CUDA graph after a warm-up and
replayed; if capture fails, it falls back to plain launches and says so."""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from eproj.bundle import BundleError
from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle


def load_step_program(bundle: Bundle, device: str) -> Any:
    """The bundle's step program as a callable module on ``device`` (any torch device:
    "cpu", "cuda", "meta", ...): x (N, C, S, S) -> reconstruction, loss, grad (and kl,
    kl_grad for the variational families)."""
    if "torch_step" not in bundle.manifest:
        raise BundleError(f"{bundle.folder} carries no torch step program (step.pt2), which the torch backend "
                          "runs; export the bundle again with this eproj")
    return _load_program(bundle, "torch_step", device)


def load_forward_program(bundle: Bundle, device: str) -> Any:
    """The bundle's forward program as a callable module on ``device``: x (N, C, S, S) ->
    reconstruction, loss; None for a bundle exported before it (no ``torch_forward``)."""
    if "torch_forward" not in bundle.manifest:
        return None
    return _load_program(bundle, "torch_forward", device)


def _load_program(bundle: Bundle, section: str, device: str) -> Any:
    """The program of manifest section ``section`` (which names its file) on ``device``."""
    import torch
    from torch.export.passes import move_to_device_pass

    entry = bundle.manifest[section]
    path = bundle.folder / entry["file"]
    data = bundle.file_bytes(entry["file"])
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as error:  # a program of another torch version, or a damaged file
        raise BundleError(f"{path} (exported with torch {entry.get('torch', '?')}) does not load in torch "
                          f"{torch.__version__}: {type(error).__name__}: {error}. Export the bundle again "
                          "with this torch") from None
    if torch.device(device) != torch.device("cpu"):
        program = move_to_device_pass(program, device)
    module = program.module()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu", cuda_graphs: bool | None = None):
        """``cuda_graphs``: on cuda, replay each iteration as a CUDA graph (default on);
        refused on the CPU, which has nothing to capture."""
        super().__init__(bundle)
        try:
            import torch
        except ImportError:
            raise ConfigError("the torch backend needs PyTorch: pip install torch") from None
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"torch device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("torch has no CUDA here (a CPU build, or no GPU)")
        if device == "cpu" and cuda_graphs is not None:
            raise ConfigError(f"cuda_graphs={cuda_graphs!r} applies to the torch backend on cuda, not on the cpu")
        self._torch = torch
        self.device = device
        self.cuda_graphs = device == "cuda" and cuda_graphs is not False
        self.captured = False
        self.kernel_threads = 1  # torch's OpenMP threads spin between ops, like ONNX Runtime's
        self.module = load_step_program(bundle, device)
        self._forward_module: Any = None  # loaded by the first prepare_forward
        self._forward_lock = threading.Lock()
        self._graph: Any = None
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

    def prepare_forward(self, x: Any, reconstruction: Any, loss: Any) -> Callable[[], None]:
        if self.module is None:
            raise ConfigError("this torch backend is closed")
        if "torch_forward" not in self.bundle.manifest:
            return super().prepare_forward(x, reconstruction, loss)
        with self._forward_lock:
            if self._forward_module is None:
                self._forward_module = load_forward_program(self.bundle, self.device)
        module, torch = self._forward_module, self._torch

        def forward() -> None:
            with torch.no_grad(), self._on_stream():
                out = module(x)
                reconstruction.copy_(out[0])
                loss.copy_(out[1])

        return forward

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
        self._graph = graph

        def replay() -> None:
            with self._on_stream():
                graph.replay()

        replay.graph = graph  # type: ignore[attr-defined]
        return replay

    def close(self) -> None:
        """Release the captured graph, the program's weights and the stream. Idempotent."""
        self._graph = None
        self.module = None
        self._forward_module = None
        if self.device == "cuda" and getattr(self, "_stream", None) is not None:
            self._stream.synchronize()
            self._stream = None

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        return f"torch ({self.device}{graphs})"
