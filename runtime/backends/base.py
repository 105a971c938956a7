"""The base class of the runtime's inference backends.

A backend owns device memory and runs the bundle's step graph (x ->
reconstruction, Lr, grad_x Lr) and its forward graph (x -> reconstruction, Lr:
the step without its gradient half) into buffers that stay put. The projection
loop (``eproj.runtime.projector``) is written once against this interface; the
fused kernels of ``eproj.cpp_ext`` run on the same buffers, on the backend's stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from eproj.runtime.bundle import Bundle

STEP_OUTPUTS = ("reconstruction", "loss", "grad")
FORWARD_OUTPUTS = ("reconstruction", "loss")


def buffer_shape(buffer: Any) -> tuple[int, ...]:
    """The shape of a buffer from ``Backend.empty`` (a NumPy array, a torch tensor or a CUDA array)."""
    interface = getattr(buffer, "__cuda_array_interface__", None)
    return tuple(int(d) for d in (interface["shape"] if interface is not None else buffer.shape))


class Backend(ABC):
    """Subclasses set ``name`` and ``device`` ("cpu" or "cuda") and implement the hooks.

    ``stream`` is what the kernels are launched on (None on the CPU);
    ``kernel_threads`` how many CPU threads they use.
    """

    name: str = ""
    device: str = "cpu"
    stream: Any = None
    # CPU threads of the fused kernels (0: OpenMP's default). Backends whose own
    # thread pool spins between graph calls set 1: the kernels are a few percent of
    # an iteration, and two pools spinning on the same cores cost far more.
    kernel_threads: int = 0
    # projection loops that may run side by side, one CPU thread each, on parts of a
    # batch (see ``serial``). On a few CPU cores, splitting the batch this way beats
    # splitting each operator across threads: no barrier after every operator, and each
    # core keeps its own images in cache. 1 for GPU backends.
    workers: int = 1

    def __init__(self, bundle: Bundle):
        self.bundle = bundle

    # -- memory ------------------------------------------------------------
    @abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A C-contiguous buffer the kernels accept (NumPy on the CPU, a CUDA array on the GPU)."""

    @abstractmethod
    def upload(self, dst: Any, host: np.ndarray) -> None:
        """Copy a host array into ``dst`` (ordered on the stream)."""

    @abstractmethod
    def download(self, src: Any) -> np.ndarray:
        """A host copy of ``src``, after the work queued before it."""

    # -- the step graph ----------------------------------------------------
    @abstractmethod
    def prepare_step(self, x: Any, reconstruction: Any, loss: Any, grad: Any) -> Callable[[], None]:
        """A call that runs the step graph on ``x`` into the three output buffers."""

    def prepare_forward(self, x: Any, reconstruction: Any, loss: Any) -> Callable[[], None]:
        """A call that runs the forward graph on ``x`` (N, C, S, S) float32 into ``reconstruction``
        f(x) (N, C, S, S) and ``loss`` Lr(x) (N,), the step graph's first two outputs.

        This default runs the step graph, its gradient written to a buffer of its own and
        ignored: the same outputs at the step's cost. Backends override it to run the bundle's
        forward graph where the bundle has one (bundles exported before it have not)."""
        return self.prepare_step(x, reconstruction, loss, self.empty(buffer_shape(x), "float32"))

    # -- execution ---------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for the queued work (nothing to wait for on the CPU)."""

    def capture(self, iteration: Callable[[], None]) -> Callable[[], None]:
        """Return a faster equivalent of ``iteration`` (a CUDA graph on GPUs); the
        buffers' contents are garbage afterwards. The CPU has nothing to capture."""
        return iteration

    def serial(self) -> "Backend":
        """This backend with its step graph on one thread, for the loops that run side
        by side when ``workers`` > 1 (their graph calls may overlap). Backends with
        ``workers`` = 1 return themselves."""
        return self

    def close(self) -> None:
        """Release what the backend holds (sessions, device memory, streams, graphs).
        Idempotent; the backend is unusable afterwards. Nothing to release by default."""

    def describe(self) -> str:
        return f"{self.name} ({self.device})"
