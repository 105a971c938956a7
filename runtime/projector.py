"""The projection loop of the runtime, written once for every backend.

Per batch: the step graph (reconstruction, Lr, grad_x Lr) -> the stop check ->
the fused update, repeated; then the fused DSSIM map with its mask and per-image
max. All of it runs on the backend's buffers and stream. The stop flags stay on
the device: the host reads them only every ``check_every`` iterations to end
the loop early, so a GPU loop is not synchronised every iteration (on the CPU
reading them is free and ``check_every`` is 1). Iterations run after every
sample has stopped change nothing, so the result equals the reference's.

The first pass keeps f(x0) and Lr(x0) on the host (the image score and the frame
range need them) and applies the zero-iteration gate (loop logic, the kernels are
unchanged). A tile is finished at x0 when it is under the stop threshold there, or
passes the gate: Lr(x0) <= ``gate_lr`` and, with ``gate_rec_error``, the largest
pixel of its reconstruction error (x0 - f(x0))^2 (channel mean) at most that. The
calibration chooses what a gated tile costs (``gate_first_update``):

- it keeps the first update, which the step at x0 has paid for, and takes no further
  step (1 iteration): the first pass is the step on every tile;
- or it takes no step at all (projection x0, 0 iterations): the first pass is the
  forward graph (x -> f(x), Lr(x): the step without its gradient half) on every tile
  and the stop check, and only the tiles not finished go on to the step at x0 and the
  first update, moved into a Projector of their count. A batch whose tiles are all
  finished at x0 costs one forward pass. The same holds without a gate for the tiles
  under the stop threshold at x0, which take no step either.

Without a gate or a stop threshold no tile can finish at x0 and the loop starts with
the step on every tile. The reconstruction baseline runs the forward graph alone.

At each read of the stop flags the loop compacts: the tiles still active move into
a Projector of their count, so a batch with one hard tile pays for one tile per
iteration. A tile that took no step is mapped by its reconstruction's DSSIM map,
scaled (``eproj.decision``).

``ParallelProjector`` splits a batch across loops that run side by side on a
CPU backend with ``workers`` > 1. Every sample's iterations depend on that
sample alone, so the split changes no result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    threshold at x0, are finished there; None: no gate); ``gate_rec_error``: with the gate,
    a tile passes it only if the largest pixel of its reconstruction error is at most this
    too (None: Lr alone); ``gate_first_update``: a gated tile keeps the first update (1
    iteration), else it takes no step (0 iterations; the forward graph alone runs on it).
    ``zero_map_scale``: the factor of the reconstruction's DSSIM map that stands for the
    map of a tile that took no step. ``compact``: finished tiles leave the batch the step
    graph runs on (the tiles finished at x0 never enter it; each later iteration runs on
    the tiles still active only, through a Projector of that size); the result is the same.
    """

    def __init__(self, backend: Backend, n: int, channels: int, size: int, config: ProjectionConfig,
                 dssim_threshold: float, method: str = "projection", check_every: int | None = None,
                 gate_lr: float | None = None, zero_map_scale: float = 1.0, compact: bool = True,
                 map_scale: tuple[float, ...] | None = None, gate_rec_error: float | None = None,
                 gate_first_update: bool = True):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if not zero_map_scale > 0:
            raise ConfigError(f"zero_map_scale must be > 0, got {zero_map_scale}")
        self.backend, self.n, self.config, self.method = backend, n, config, method
        self.channels, self.size, self.dssim_threshold = channels, size, dssim_threshold
        self.gate_lr, self.zero_map_scale, self.compact = gate_lr, float(zero_map_scale), compact
        self.map_scale = map_scale
        self.gate_rec_error, self.gate_first_update = gate_rec_error, bool(gate_first_update)
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
        self._forward_call: Callable[[], None] | None = None  # prepared by the first forward pass
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

    def _forward(self) -> None:
        """The forward graph on x0 into ``reconstruction`` and ``loss`` (f(x0), Lr(x0))."""
        if self._forward_call is None:
            self._forward_call = self.backend.prepare_forward(self.x0, self.reconstruction, self.loss)
        self._forward_call()

    def _forward_first(self) -> bool:
        """Whether the first pass is the forward graph: where no step follows (the reconstruction,
        max_iters 0), or where a tile finished at x0 takes no step (a gate whose tiles do not keep
        the first update; without a gate, a stop threshold) and only the others take the step."""
        if self.method != "projection" or self.config.max_iters == 0:
            return True
        if self.gate_lr is not None:
            return not self.gate_first_update
        threshold = self.config.stop_threshold
        return threshold is not None and threshold > float("-inf")

    def _passes_gate(self, lr0: np.ndarray, x0: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        """(n,) bool: Lr(x0) <= gate_lr and, with ``gate_rec_error``, the largest pixel of the
        reconstruction error (``rec_error_map``) at most it."""
        assert self.gate_lr is not None
        passed = lr0 <= self.gate_lr
        if self.gate_rec_error is not None:
            passed &= rec_error_map(x0, reconstruction).reshape(self.n, -1).max(axis=1) <= self.gate_rec_error
        return passed

    def _first_pass(self, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Carry | None]:
        """Lr(x0) and f(x0), the stop check and the gate, and the step at x0 with the first update
        for the tiles that take it; ``x0`` (n, C, S, S) the batch on the host. Returns Lr(x0) (n,),
        f(x0) (n, C, S, S), the gated tiles (n,) bool and where the loop carries on (None: no
        tile takes a step)."""
        b = self.backend
        gated = np.zeros(self.n, bool)
        if not self._forward_first():  # every tile takes the step at x0: it gives f(x0) and Lr(x0)
            self._step()
            lr0, reconstruction = b.download(self.loss), b.download(self.reconstruction)
            self._stop()
            if self.gate_lr is not None:
                # finished at x0: stopped by the threshold (all were active before the check), or
                # passing the gate; they keep the first update and take no further step
                gated = ~b.download(self.active).astype(bool) | self._passes_gate(lr0, x0, reconstruction)
                if gated.any():
                    b.upload(self.active, np.ones(self.n, np.uint8))
            self._update()
            if gated.any():
                b.upload(self.active, (~gated).astype(np.uint8))
            return lr0, reconstruction, gated, _Carry(self, np.arange(self.n), None)
        self._forward()
        lr0, reconstruction = b.download(self.loss), b.download(self.reconstruction)
        if self.method != "projection":
            return lr0, reconstruction, gated, None
        self._stop()  # records Lr(x0) as every tile's final loss (all are active before it)
        if self.config.max_iters == 0:
            return lr0, reconstruction, gated, None
        # finished at x0: stopped by the threshold, or passing the gate; they take no step
        finished = ~b.download(self.active).astype(bool)
        if self.gate_lr is not None:
            finished |= self._passes_gate(lr0, x0, reconstruction)
            gated = finished
        if finished.all():
            return lr0, reconstruction, gated, None
        return lr0, reconstruction, gated, self._first_step(finished)

    def _first_step(self, finished: np.ndarray) -> _Carry:
        """The step at x0 and the first update of the tiles not ``finished`` (n,) bool, after the
        forward pass and the stop check: with ``compact`` and a tile finished, on a Projector of
        the others only (the stop check's state moves with them)."""
        b = self.backend
        if not finished.any() or not self.compact:
            if finished.any():
                b.upload(self.active, (~finished).astype(np.uint8))
            self._step()  # f(x0) and Lr(x0) again, as the update reads them, and the gradient
            self._update()
            return _Carry(self, np.arange(self.n), None)
        state = self._download_state()
        state["active"] = (~finished).astype(np.uint8)
        rows = np.nonzero(~finished)[0]
        work = self._smaller_projector(len(rows))
        work._upload_state({name: value[rows] for name, value in state.items()})
        work._step()
        work._update()
        return _Carry(work, rows, state)

    def _loop(self, carry: _Carry) -> None:
        """Iterations 2 .. max_iters and the last iterate's stop check, from ``carry`` (the first
        step's projector and rows). Every ``check_every`` iterations the host reads the stop
        flags: it ends the loop when none is active and, with ``compact``, moves the active
        tiles into a smaller Projector (the finished ones keep their state on the host). The
        last iterate's step and stop check run only where a tile is still active (they record
        nothing for the others). At the end, ``self`` holds every tile's state."""
        b = self.backend
        work, rows, finished = carry.work, carry.rows, carry.state
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
        if b.download(work.active).any():  # the last iterate: its loss, and the stop check's final record
            work._step()
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
        lr0, reconstruction, gated, carry = self._first_pass(x0)
        if carry is not None:
            self._loop(carry)
        b.synchronize()
        looped = time.perf_counter()
        self._dssim()
        iterations = b.download(self.iterations).astype(np.int64)
        still = np.nonzero(iterations == 0)[0] if self.method == "projection" else np.zeros(0, np.int64)
        if len(still):  # the projection of these is x0: their map is f(x0)'s
            if carry is not None and carry.work is self:
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


@dataclass
class _Carry:
    """Where the loop carries on after the first step: ``work`` the Projector running the
    tiles that took it, ``rows`` (k,) their rows in the batch, ``state`` every tile's state
    on the host (``_download_state``) when ``work`` is a smaller Projector, else None."""

    work: Projector
    rows: np.ndarray
    state: dict[str, np.ndarray] | None


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
                 map_scale: tuple[float, ...] | None = None, gate_rec_error: float | None = None,
                 gate_first_update: bool = True, workers: int = 2):
        if not 2 <= workers <= n:
            raise ConfigError(f"a parallel projector needs 2 <= workers <= n, got workers={workers}, n={n}")
        self.n, self.backend = n, backend
        sizes = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        self.bounds = np.cumsum([0] + sizes)
        self.parts = [Projector(backend, k, channels, size, config, dssim_threshold, method, check_every,
                                gate_lr, zero_map_scale, compact, map_scale, gate_rec_error, gate_first_update)
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
