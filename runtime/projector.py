"""The projection loop of the runtime, written once for every backend.

Per batch: the step graph (reconstruction, Lr, grad_x Lr) -> the stop check ->
the fused update, repeated; then the fused DSSIM map with its mask and per-image
max. All of it runs on the backend's buffers and stream. The stop flags stay on
the device: the host reads them only every ``check_every`` iterations to end
the loop early, so a GPU loop is not synchronised every iteration (on the CPU
reading them is free and ``check_every`` is 1). Iterations run after every
sample has stopped change nothing, so the result equals the reference's.

The first iteration keeps f(x0) and Lr(x0) on the host (the image score and the
frame range need them) and applies the zero-iteration gate (loop logic, the
kernels are unchanged): a tile with Lr(x0) <= gate keeps the first update, which
the step at x0 already paid for, and takes no further step. At each read of the stop flags the loop compacts: the
tiles still active move into a Projector of their count, so a batch with one hard
tile pays for one tile per iteration. A tile that took no step is mapped by its
reconstruction's DSSIM map, scaled (``eproj.decision``).

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
from eproj.decision import GATE_REASON, map_factors, rec_error_map, tile_std
from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend

METHODS = ("projection", "reconstruction")  # what the loop runs; the Inspector adds "ensemble" on top


@dataclass
class BatchOutput:
    """Host arrays of one batch of T tiles: ``target`` (T, C, S, S) the projection
    (or reconstruction); ``dssim`` (T, S, S) float32, the anomaly map; ``mask`` (T, S, S)
    bool; ``tile_max`` (T,); ``iterations`` (T,) int; ``stop_reason`` per tile; ``loss``
    (T,) Lr of the target; ``lr0`` (T,) Lr(x0); ``rec_error`` (T, S, S) float32,
    (x0 - f(x0))^2 averaged over channels; ``timings`` in milliseconds.

    A projected tile that took no step (gated, or under the stop threshold at x0)
    has projection == x0: its ``dssim``, ``mask`` and ``tile_max`` are those of the
    reconstruction's map DSSIM(x0, f(x0)) times the zero-iteration scale
    (``eproj.decision``), never the all-zero DSSIM(x0, x0)."""

    target: np.ndarray
    dssim: np.ndarray
    mask: np.ndarray
    tile_max: np.ndarray
    iterations: np.ndarray
    stop_reason: list[str]
    loss: np.ndarray
    lr0: np.ndarray
    rec_error: np.ndarray
    timings: dict[str, float]
    x0_std: np.ndarray | None = None  # (T,) standard deviation of each tile's pixels


# the per-sample state the loop carries from one iteration to the next (what moves
# when finished samples leave the batch)
_STATE = ("x", "x0", "m", "v", "mask", "iterations", "distance", "previous", "reason", "active",
          "final_loss", "final_energy")


class Projector:
    """The loop for batches of exactly ``n`` tiles of (C, S, S) on one backend.

    ``gate_lr``: the zero-iteration gate (tiles with Lr(x0) <= it, or under the stop
    threshold at x0, keep the first update and take no further step; None: no gate). ``zero_map_scale``: the factor of the reconstruction's DSSIM map that
    stands for the map of a tile that took no step. ``compact``: finished tiles leave
    the batch the step graph runs on (each later iteration runs on the tiles still
    active only, through a Projector of that size); the result is the same.
    """

    def __init__(self, backend: Backend, n: int, channels: int, size: int, config: ProjectionConfig,
                 dssim_threshold: float, method: str = "projection", check_every: int | None = None,
                 gate_lr: float | None = None, zero_map_scale: float = 1.0, compact: bool = True,
                 map_scale: tuple[float, ...] | None = None):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if not zero_map_scale > 0:
            raise ConfigError(f"zero_map_scale must be > 0, got {zero_map_scale}")
        self.backend, self.n, self.config, self.method = backend, n, config, method
        self.channels, self.size, self.dssim_threshold = channels, size, dssim_threshold
        self.gate_lr, self.zero_map_scale, self.compact = gate_lr, float(zero_map_scale), compact
        self.map_scale = map_scale
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
        self._recon_dssim = None
        if method == "projection":  # the map of the tiles that take no step: DSSIM(x0, f(x0)), scaled
            self.recon_dssim = b.empty((n, size, size), "float32")
            self.recon_mask = b.empty((n, size, size), "uint8")
            self.recon_max, self.recon_mean = b.empty((n,), "float32"), b.empty((n,), "float32")
            self._recon_dssim = kernels.prepare_dssim_map(
                self.x0, self.reconstruction, threshold=dssim_threshold / self.zero_map_scale, stats=True,
                out=self.recon_dssim, mask=self.recon_mask, max=self.recon_max, mean=self.recon_mean,
                stream=stream, threads=b.kernel_threads)
        self._smaller: dict[int, Projector] = {}
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

    def _download_state(self) -> dict[str, np.ndarray]:
        return {name: self.backend.download(getattr(self, name)) for name in _STATE
                if getattr(self, name) is not None}

    def _upload_state(self, state: dict[str, np.ndarray]) -> None:
        for name, value in state.items():
            self.backend.upload(getattr(self, name), np.ascontiguousarray(value))

    def _smaller_projector(self, k: int) -> "Projector":
        """A Projector of ``k`` < n tiles on the same backend that carries on the loop (cached)."""
        if k not in self._smaller:
            self._smaller[k] = Projector(self.backend, k, self.channels, self.size, self.config,
                                         self.dssim_threshold, self.method, self.check_every, compact=False)
        return self._smaller[k]

    def _first_iteration(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The step on x0 for the whole batch, the stop check, the gate and the first update.
        Returns Lr(x0) (n,), f(x0) (n, C, S, S) and the gated tiles (n,) bool."""
        b = self.backend
        self._step()
        lr0, reconstruction = b.download(self.loss), b.download(self.reconstruction)
        gated = np.zeros(self.n, bool)
        if self.method != "projection":
            return lr0, reconstruction, gated
        self._stop()
        if self.config.max_iters > 0:
            if self.gate_lr is not None:
                # finished at x0: under the gate, or stopped by the threshold (all were active before
                # the check); they keep the first update, which the step at x0 paid for
                gated = ~b.download(self.active).astype(bool) | (lr0 <= self.gate_lr)
                if gated.any():
                    b.upload(self.active, np.ones(self.n, np.uint8))
            self._update()
            if gated.any():
                b.upload(self.active, (~gated).astype(np.uint8))
        return lr0, reconstruction, gated

    def _loop(self) -> None:
        """Iterations 2 .. max_iters and the last iterate's stop check. Every ``check_every``
        iterations the host reads the stop flags: it ends the loop when none is active and,
        with ``compact``, moves the active tiles into a smaller Projector (the finished ones
        keep their state on the host). At the end, ``self`` holds every tile's state."""
        b = self.backend
        work, rows, finished = self, np.arange(self.n), None
        for t in range(2, self.config.max_iters + 1):
            if (t - 1) % self.check_every == 0:
                active = b.download(work.active).astype(bool)
                if not active.any():
                    break
                if self.compact and not active.all():
                    state = work._download_state()
                    if finished is None:  # the first compaction: every tile's state, from self
                        finished = state
                    else:
                        for name, value in state.items():
                            finished[name][rows] = value
                    keep = np.nonzero(active)[0]
                    rows = rows[keep]
                    work = self._smaller_projector(len(keep))
                    work._upload_state({name: value[keep] for name, value in state.items()})
            work._iteration()
        work._step()  # the last iterate: its loss, and the stop check's final record
        work._stop()
        if work is not self:
            assert finished is not None
            for name, value in work._download_state().items():
                finished[name][rows] = value
            self._upload_state(finished)

    def run(self, x0: np.ndarray, mask: np.ndarray | None = None) -> BatchOutput:
        """Project (or reconstruct) ``x0`` (n, C, S, S) float32 in [0, 1]."""
        if x0.shape[0] != self.n:
            raise RuntimeError(f"projector for batches of {self.n} got {x0.shape[0]}")
        b = self.backend
        start = time.perf_counter()
        self._reset(x0, mask)
        lr0, reconstruction, gated = self._first_iteration()
        if self.method == "projection" and self.config.max_iters > 0:
            self._loop()
        b.synchronize()
        looped = time.perf_counter()
        self._dssim()
        iterations = b.download(self.iterations).astype(np.int64)
        still = np.nonzero(iterations == 0)[0] if self.method == "projection" else np.zeros(0, np.int64)
        if len(still):  # the projection of these is x0: f(x0) is still in the reconstruction buffer
            if self.config.max_iters > 0:
                b.upload(self.reconstruction, reconstruction)  # the loop overwrote it
            self._recon_dssim()
        b.synchronize()
        mapped = time.perf_counter()
        target = self.x if self.method == "projection" else self.reconstruction
        out = BatchOutput(
            target=b.download(target), dssim=b.download(self.dssim), mask=b.download(self.dssim_mask).astype(bool),
            tile_max=b.download(self.tile_max), iterations=iterations, stop_reason=["none"] * self.n,
            loss=b.download(self.final_loss if self.method == "projection" else self.loss),
            lr0=lr0, rec_error=rec_error_map(x0, reconstruction), timings={}, x0_std=tile_std(x0))
        if self.method == "projection":
            reasons = b.download(self.reason)
            out.stop_reason = [GATE_REASON if g else STOP_REASON_CODES[int(r)] for g, r in zip(gated, reasons)]
        if len(still):
            out.dssim[still] = b.download(self.recon_dssim)[still]
        if self.method == "projection":  # every map on one scale (eproj.decision.map_factors)
            factors = map_factors(iterations, self.map_scale, self.zero_map_scale)
            scaled = np.nonzero(factors != 1)[0]
            if len(scaled):
                out.dssim[scaled] *= factors[scaled, None, None]
                out.mask[scaled] = out.dssim[scaled] > self.dssim_threshold
                out.tile_max[scaled] = out.dssim[scaled].reshape(len(scaled), -1).max(axis=1)
        out.timings = {"iterations": 1e3 * (looped - start), "dssim": 1e3 * (mapped - looped),
                       "download": 1e3 * (time.perf_counter() - mapped)}
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
                       loss=np.concatenate([p.loss for p in parts]), lr0=np.concatenate([p.lr0 for p in parts]),
                       rec_error=np.concatenate([p.rec_error for p in parts]), timings={},
                       x0_std=np.concatenate([p.x0_std for p in parts]))


class ParallelProjector:
    """``Projector``'s interface for batches of ``n`` tiles, split into ``workers``
    nearly equal parts, each looped by its own Projector on its own thread.

    ``backend`` must allow overlapping step calls (``Backend.serial()``); the
    fused kernels release the GIL, so the parts run truly in parallel.
    """

    def __init__(self, backend: Backend, n: int, channels: int, size: int, config: ProjectionConfig,
                 dssim_threshold: float, method: str = "projection", check_every: int | None = None,
                 gate_lr: float | None = None, zero_map_scale: float = 1.0, compact: bool = True,
                 map_scale: tuple[float, ...] | None = None, workers: int = 2):
        if not 2 <= workers <= n:
            raise ConfigError(f"a parallel projector needs 2 <= workers <= n, got workers={workers}, n={n}")
        self.n, self.backend = n, backend
        sizes = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        self.bounds = np.cumsum([0] + sizes)
        self.parts = [Projector(backend, k, channels, size, config, dssim_threshold, method, check_every,
                                gate_lr, zero_map_scale, compact, map_scale) for k in sizes]
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
