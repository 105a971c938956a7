"""``eproj bench``: the runtime's latency on one backend, beside a reference doing
the same work (same frames, same iteration count, same device) in the same run.
The runtime knows no reference of its own (it never imports the training code):
the command line passes the PyTorch eager-autograd one
(``eproj.benchmarking.eager_reference``).

Every frame runs exactly ``iters`` iterations (the stop threshold, the energy
criterion and the zero-iteration gate are switched off), so both sides do equal work. Rows report
latency p50/p90/p99 per call of ``batch`` frames, frames per second, the split
into preprocess / iterations / DSSIM / postprocess, the share of the iteration
time spent outside the network (the step graph timed alone), and the
reference's p50 with the ratio reference / runtime.

With ``progress`` (the command line's default) it says what it is doing on
stderr: loading each backend, warming up (the first calls build the sessions
and let ONNX Runtime or TensorRT choose their kernels, the longest silent
step), a bar over the timed calls of each batch size, and the reference.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from eproj.runtime.inspector import Inspector

STAGES = ("preprocess", "iterations", "dssim", "postprocess")
Reference = Callable[[Inspector, list[np.ndarray], int, int], dict[str, Any]]


def synthetic_frames(n: int, size: int, channels: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random textures, uint8, (size, size) or (size, size, 3) BGR."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        noise = rng.normal(0, 1, (size, size, channels)).astype(np.float32)
        smooth = cv2.GaussianBlur(noise, (0, 0), 2).reshape(size, size, channels)
        image = np.clip(128 + 40 * smooth / (smooth.std() + 1e-6), 0, 255).astype(np.uint8)
        frames.append(image[:, :, 0] if channels == 1 else image)
    return frames


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99))}


def _network_ms(inspector: Inspector, batch_tiles: int, iters: int) -> float:
    """The step graph alone, ``iters`` times on a batch: the network's share of an iteration loop."""
    projector = inspector._projector(batch_tiles)
    projector._step()
    inspector.backend.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        projector._step()
    inspector.backend.synchronize()
    return 1e3 * (time.perf_counter() - start)


def bench(bundle: str, backend: str = "auto", device: str | None = None, batches: tuple[int, ...] = (1, 8, 32),
          iters: int = 30, size: int | None = None, warmup: int = 3, repeats: int = 20, threads: int | None = None,
          precision: str | None = None, reference: Reference | None = None,
          progress: bool = False) -> dict[str, Any]:
    """Latency rows for each batch size; see the module docstring.

    ``reference(inspector, frames, warmup, repeats)`` times the same work another way and
    returns ``{"available": bool, "p50_ms": ...}`` (or ``"why"``); None leaves it out.
    ``progress``: say each step on stderr and show a bar per batch size.
    """
    def say(message: str) -> None:
        if progress:
            print(f"eproj bench: {message}", file=sys.stderr, flush=True)

    say(f"loading {bundle} ({backend} backend)")
    probe = Inspector.from_bundle(bundle, backend=backend, device=device, threads=threads, precision=precision)
    say(probe.backend_note)
    frame_size = size or probe.bundle.size
    fit = "none" if frame_size == probe.bundle.size else None
    rows = []
    for batch in batches:
        inspector = Inspector.from_bundle(bundle, backend=backend, device=device, threads=threads,
                                          precision=precision, fit=fit, batch_size=max(batch, 1) * 64,
                                          max_iters=iters, stop_threshold=float("-inf"), energy_tol=0.0,
                                          gate_lr=float("-inf"))
        frames = synthetic_frames(batch, frame_size, inspector.bundle.channels, seed=batch)
        if warmup:
            say(f"batch {batch}: {warmup} warm-up call(s): building the loops and letting the backend choose "
                "its kernels (the first call can take a while)")
        for _ in range(warmup):
            inspector(frames)
        samples, stages = [], {k: 0.0 for k in STAGES}
        for _ in tqdm(range(repeats), desc=f"batch {batch}", unit="call", disable=not progress, leave=False):
            start = time.perf_counter()
            results = inspector(frames)
            samples.append(1e3 * (time.perf_counter() - start))
            for k in STAGES:
                stages[k] += results[0].timings[k] / repeats
        assert all(r.iterations == iters for r in results), "every frame must run the same iteration count"
        tiles = inspector._projectors and next(iter(inspector._projectors))
        network = _network_ms(inspector, tiles, iters)
        row: dict[str, Any] = {"batch": batch, "frame_size": frame_size, "tiles": tiles, "iterations": iters,
                               **percentiles(samples)}
        row["fps"] = batch / (row["p50_ms"] / 1e3)
        row["stages_ms"] = stages
        row["network_ms"] = network
        row["share_outside_network"] = max(0.0, 1.0 - network / stages["iterations"]) if stages["iterations"] else None
        if reference is not None:
            say(f"batch {batch}: the reference, doing the same work")
            ref = reference(inspector, frames, max(1, warmup // 2), max(3, repeats // 4))
            row["reference_eager_autograd"] = ref
            if ref.get("available"):
                row["speedup_vs_reference"] = ref["p50_ms"] / row["p50_ms"]
        rows.append(row)
        say(f"batch {batch}: p50 {row['p50_ms']:.1f} ms, {row['fps']:.1f} frames/s")
    import eproj.cpp_ext as kernels

    return {"benchmark": "eproj bench", "bundle": str(bundle), "backend": probe.backend_note,
            "family": probe.bundle.family, "model_size": probe.bundle.size, "channels": probe.bundle.channels,
            "threads": threads or 0, "machine": platform.machine(), "kernels": kernels.build_info(), "rows": rows}
