"""The eager-autograd reference that ``eproj bench`` and ``benchmarks/`` time the
runtime against: it spans the stages (the runtime's frames and parameters, the
training code's projection), so it lives with the command line, not in the runtime."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from eproj.runtime.bench import percentiles
from eproj.runtime.frames import to_batch
from eproj.runtime.inspector import Inspector


def eager_reference(inspector: Inspector, frames: list[np.ndarray], warmup: int, repeats: int) -> dict[str, Any]:
    """The same work as the runtime with eager autograd (``eproj.train.projection.project``
    and the torch DSSIM map) on the inspector's device, frames and parameters: p50/p90/p99
    of ``repeats`` calls after ``warmup``; ``{"available": False, "why": ...}`` without torch."""
    try:
        import torch

        from eproj.train.checkpoint import load_model
        from eproj.train.losses import dssim_map
        from eproj.train.projection import project
    except ImportError as error:
        return {"available": False, "why": f"{error}"}
    device = "cuda" if inspector.backend.device == "cuda" else "cpu"
    model = load_model(inspector.bundle.weights_path).model.to(device).eval()
    config, threshold = inspector.config, inspector.pixel_threshold
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once() -> None:
        x0, _, _ = to_batch(frames, inspector.bundle.size, inspector.bundle.channels, inspector.fit,
                            inspector.channel_order, scale=inspector.scale, stride=inspector.tile_stride)
        x = torch.from_numpy(x0).to(device)
        result = project(model, x, config)
        with torch.no_grad():
            dssim = dssim_map(x, result.projection)
        (dssim > threshold).cpu().numpy()
        dssim.max().item()
        sync()

    for _ in range(warmup):
        once()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        samples.append(1e3 * (time.perf_counter() - start))
    return {"available": True, "device": device, **percentiles(samples)}
