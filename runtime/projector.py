"""The projection loop of the runtime, written once for every backend.

Per batch: the step graph (reconstruction, Lr, grad_x Lr) -> the stop check ->
the fused update, repeated; then the fused DSSIM map with its mask and per-image
max. All of it runs on the backend's buffers and stream. The stop flags stay on
the device: the host reads them only every ``check_every`` iterations to end
the loop early, so a GPU loop is not synchronised every iteration (on the CPU
reading them is free and ``check_every`` is 1). Iterations run after every
sample has stopped change nothing, so the result equals the reference's.

``ParallelProjector`` splits a batch across loops that run side by side on a
CPU backend with ``workers`` > 1. Every sample's iterations depend on that
sample alone, so the split changes no result.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import eproj.cpp_ext as kernels
from eproj.config import STOP_REASON_CODES, ProjectionConfig
from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend

METHODS = ("projection", "reconstruction")  # what the loop runs; the Inspector adds "ensemble" on top


@dataclass
class BatchOutput:
    """Host arrays of one batch of T tiles: ``target`` (T, C, S, S) the projection
    (or reconstruction); ``dssim`` (T, S, S) float32; ``mask`` (T, S, S) bool;
    ``tile_max`` (T,); ``iterations`` (T,) int; ``stop_reason`` per tile; ``loss``
    (T,) Lr of the target; ``timings`` in milliseconds."""

    target: np.ndarray
    dssim: np.ndarray
    mask: np.ndarray
    tile_max: np.ndarray
    iterations: np.ndarray
    stop_reason: list[str]
    loss: np.ndarray
    timings: dict[str, float]


class Projector:
    """The loop for batches of exactly ``n`` tiles of (C, S, S) on one backend."""

    def __init__(self, backend: Backend, n: int, channels: int, size: int, config: ProjectionConfig,
                 dssim_threshold: float, method: str = "projection", check_every: int | None = None):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        self.backend, self.n, self.config, self.method = backend, n, config, method
        self.check_every = check_every or (1 if backend.device == "cpu" else 8)
        b = backend
        shape = (n, channels, size, size)
        self.x0, self.x = b.empty(shape, "float32"), b.empty(shape, "float32")
        self.reconstruction, self.grad = b.empty(shape, "float32"), b.empty(shape, "float32")
        vectors = ("loss", "distance", "energy", "previous", "final_loss", "final_energy")
        for name in vectors:
            setattr(self, name, b.empty((n,), "float32"))
        self.active = b.empty((n,), "uint8")
        self.iterations = b.empty((n,), "int32")
        self.reason = b.empty((n,), "int32")
        adam = config.step == "adam"
        self.m = b.empty(shape, "float32") if adam else None
        self.v = b.empty(shape, "float32") if adam else None
        self.mask = b.empty((n, 1, size, size), "float32") if config.weighting == "mask" else None
        self.dssim = b.empty((n, size, size), "float32")
        self.dssim_mask = b.empty((n, size, size), "uint8")
        self.tile_max, self.tile_mean = b.empty((n,), "float32"), b.empty((n,), "float32")
        stream = b.stream

        self._step = b.prepare_step(self.x, self.reconstruction, self.loss, self.grad)
        self._stop = kernels.prepare_stop_check(self.loss, self.distance, self.iterations, self.active,
                                                self.previous, self.reason, self.final_loss, self.final_energy,
                                                config=config, stream=stream)
        self._update = kernels.prepare_update(self.x, self.x0, self.reconstruction, self.grad, self.loss,
                                              self.active, self.iterations, config=config, mask=self.mask,
                                              m=self.m, v=self.v, distance=self.distance, energy=self.energy,
                                              stream=stream, threads=b.kernel_threads)
        target = self.x if method == "projection" else self.reconstruction
        self._dssim = kernels.prepare_dssim_map(self.x0, target, threshold=dssim_threshold, stats=True,
                                                out=self.dssim, mask=self.dssim_mask, max=self.tile_max,
                                                mean=self.tile_mean, stream=stream, threads=b.kernel_threads)
        self._zeros = np.zeros(shape, np.float32)
        self._start_vectors = {"active": np.ones(n, np.uint8), "iterations": np.zeros(n, np.int32),
                               "reason": np.zeros(n, np.int32), "distance": np.zeros(n, np.float32),
                               "previous": np.full(n, np.inf, np.float32)}
        self._iteration = self._step
        if method == "projection" and config.max_iters > 0:
            def iteration() -> None:
                self._step()
                self._stop()
                self._update()

            warm_mask = None if self.mask is None else np.ones((n, 1, size, size), np.float32)
            self._reset(self._zeros, warm_mask)
            self._iteration = b.capture(iteration)

    def _reset(self, x0: np.ndarray, mask: np.ndarray | None) -> None:
        b = self.backend
        b.upload(self.x0, x0)
        b.upload(self.x, x0)
        for name, value in self._start_vectors.items():
            b.upload(getattr(self, name), value)
        if self.m is not None:
            b.upload(self.m, self._zeros)
            b.upload(self.v, self._zeros)
        if self.mask is not None:
            if mask is None:
                raise ConfigError("weighting='mask' needs a known mask for every frame")
            b.upload(self.mask, mask)

    def run(self, x0: np.ndarray, mask: np.ndarray | None = None) -> BatchOutput:
        """Project (or reconstruct) ``x0`` (n, C, S, S) float32 in [0, 1]."""
        if x0.shape[0] != self.n:
            raise RuntimeError(f"projector for batches of {self.n} got {x0.shape[0]}")
        b = self.backend
        start = time.perf_counter()
        self._reset(x0, mask)
        if self.method == "projection":
            for t in range(1, self.config.max_iters + 1):
                self._iteration()
                if t % self.check_every == 0 and not b.download(self.active).any():
                    break
            self._step()  # the last iterate: its loss, and the stop check's final record
            self._stop()
        else:
            self._step()
        b.synchronize()
        looped = time.perf_counter()
        self._dssim()
        b.synchronize()
        mapped = time.perf_counter()
        target = self.x if self.method == "projection" else self.reconstruction
        iterations = b.download(self.iterations)
        reasons = b.download(self.reason) if self.method == "projection" else None
        out = BatchOutput(
            target=b.download(target), dssim=b.download(self.dssim), mask=b.download(self.dssim_mask).astype(bool),
            tile_max=b.download(self.tile_max), iterations=iterations.astype(np.int64),
            stop_reason=[STOP_REASON_CODES[int(r)] for r in reasons] if reasons is not None else ["none"] * self.n,
            loss=b.download(self.final_loss if self.method == "projection" else self.loss),
            timings={"iterations": 1e3 * (looped - start), "dssim": 1e3 * (mapped - looped)})
        out.timings["download"] = 1e3 * (time.perf_counter() - mapped)
        return out

    def close(self) -> None:
        """Nothing of its own to release: its buffers belong to the backend."""


def concatenate(parts: list[BatchOutput]) -> BatchOutput:
    """One BatchOutput of the parts' tiles in order; timings are left to the caller."""
    if len(parts) == 1:
        return parts[0]
    return BatchOutput(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("target", "dssim", "mask", "tile_max", "iterations")),
                       stop_reason=[r for p in parts for r in p.stop_reason],
                       loss=np.concatenate([p.loss for p in parts]), timings={})


class ParallelProjector:
    """``Projector``'s interface for batches of ``n`` tiles, split into ``workers``
    nearly equal parts, each looped by its own Projector on its own thread.

    ``backend`` must allow overlapping step calls (``Backend.serial()``); the
    fused kernels release the GIL, so the parts run truly in parallel.
    """

    def __init__(self, backend: Backend, n: int, channels: int, size: int, config: ProjectionConfig,
                 dssim_threshold: float, method: str = "projection", check_every: int | None = None,
                 workers: int = 2):
        if not 2 <= workers <= n:
            raise ConfigError(f"a parallel projector needs 2 <= workers <= n, got workers={workers}, n={n}")
        self.n, self.backend = n, backend
        sizes = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        self.bounds = np.cumsum([0] + sizes)
        self.parts = [Projector(backend, k, channels, size, config, dssim_threshold, method, check_every)
                      for k in sizes]
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eproj-loop")

    def close(self) -> None:
        """Stop the loops' threads (after the batch in flight). Idempotent."""
        self._pool.shutdown(wait=True)

    def _step(self) -> None:
        """The step graph once on every part, side by side (for the benchmark's network time)."""
        list(self._pool.map(lambda part: part._step(), self.parts))

    def run(self, x0: np.ndarray, mask: np.ndarray | None = None) -> BatchOutput:
        """``Projector.run`` on each part at once; stage timings are the slowest part's."""
        if x0.shape[0] != self.n:
            raise RuntimeError(f"projector for batches of {self.n} got {x0.shape[0]}")
        spans = list(zip(self.bounds[:-1], self.bounds[1:]))
        futures = [self._pool.submit(part.run, x0[a:b], None if mask is None else mask[a:b])
                   for part, (a, b) in zip(self.parts, spans)]
        parts = [f.result() for f in futures]
        out = concatenate(parts)
        out.timings = {k: max(p.timings[k] for p in parts) for k in parts[0].timings}
        return out
