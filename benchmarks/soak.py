"""A memory soak of ``eproj run``: 10,000 frames through the streaming loop, RSS sampled, as JSON.

The shipped brick model is exported to a bundle and an ONNX Runtime (CPU) Inspector runs it;
``eproj.runtime.cli.run_stream`` (the loop of ``eproj run``: inspection, mask and overlay
files, one checked results.jsonl line per frame) gets its frames from memory:

- normal frames: 128 x 128 uint8 crops of scikit-image's 512 x 512 brick (the model's scale),
- defective ones: the same crops with a seeded defect from ``eproj.train.defects``,
- bad ones, each of which must be recorded with its reason and never stop the run: a float
  frame with NaN pixels, a frame of the wrong shape (4 channels), an empty frame (0 x 128),
  and an input that could not be read (no image, as a decode failure gives).

The process's resident set size (VmRSS of /proc/self/status) is sampled every
``--sample-every`` frames. A least-squares line through the samples of the second half
(the first half holds the warm-up: allocator arenas, ONNX Runtime's buffers, caches) gives
the growth in bytes per frame (the projection's iteration cap is lowered to ``--max-iters``, 10
by default: memory, not accuracy, is measured); the soak passes when it stays under ``--max-slope`` and every
frame is accounted for in results.jsonl (one line each, every bad frame recorded with an
error, no good frame lost). Exit status 1 when it fails.

    python benchmarks/soak.py --json benchmarks/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("normal", "defective", "nan", "wrong_shape", "empty", "unreadable")


def rss_bytes() -> int:
    """The resident set size of this process now (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status (not Linux?)")


def kind_of(index: int) -> str:
    """The kind of frame ``index``: a fixed interleaving, so any stretch of frames has each kind."""
    if index % 50 == 7:
        return "nan"
    if index % 50 == 19:
        return "wrong_shape"
    if index % 100 == 31:
        return "empty"
    if index % 100 == 43:
        return "unreadable"
    if index % 5 == 2:
        return "defective"
    return "normal"


def brick_pools(side: int, count: int, seed: int) -> dict[str, list[np.ndarray]]:
    """``count`` normal and ``count`` defective side x side uint8 crops of the brick texture."""
    from skimage import data

    from eproj.train.defects import add_defect

    brick = data.brick().astype(np.float32)[:, :, None] / 255.0
    foreign = [getattr(data, name)().astype(np.float32)[:side, :side, None] / 255.0 for name in ("grass", "gravel")]
    rng = np.random.default_rng(seed)
    pools: dict[str, list[np.ndarray]] = {"normal": [], "defective": []}
    for _ in range(count):
        y, x = (int(v) for v in rng.integers(0, brick.shape[0] - side, 2))
        crop = brick[y:y + side, x:x + side]
        defective, _, _ = add_defect(rng, crop, foreign)
        for kind, image in (("normal", crop), ("defective", defective)):
            pools[kind].append(np.clip(image[:, :, 0] * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return pools


def frames(n: int, pools: dict[str, list[np.ndarray]], side: int, samples: list[dict[str, Any]],
           every: int, started: float) -> Iterator[Any]:
    """The soak's Frames, sampling RSS before frames 0, every, 2 every, ... (the frames before
    them have gone through the whole loop by then)."""
    from eproj.runtime.sources import Frame

    for i in range(n):
        if i % every == 0:
            samples.append({"frame": i, "rss_bytes": rss_bytes(), "seconds": time.perf_counter() - started})
        kind, name = kind_of(i), f"{i:05d}"
        if kind in ("normal", "defective"):
            pool = pools[kind]
            yield Frame(name, pool[i % len(pool)].copy())  # a new array per frame, as a camera gives
        elif kind == "nan":
            image = np.full((side, side), 0.5, np.float32)
            image[::7, ::5] = np.nan
            yield Frame(name, image)
        elif kind == "wrong_shape":
            yield Frame(name, np.zeros((side, side, 4), np.uint8))
        elif kind == "empty":
            yield Frame(name, np.zeros((0, side), np.uint8))
        else:
            yield Frame(name, None, "cannot be decoded (the soak's stand-in for a corrupt file)")


def fit_slope(samples: list[dict[str, Any]], start: int) -> float:
    """Bytes per frame: the least-squares slope of RSS against the frame index, samples from ``start``."""
    tail = [s for s in samples if s["frame"] >= start]
    if len(tail) < 2:
        raise ValueError(f"need at least two RSS samples from frame {start}, got {len(tail)}")
    x = np.array([s["frame"] for s in tail], np.float64)
    y = np.array([s["rss_bytes"] for s in tail], np.float64)
    return float(np.polyfit(x, y, 1)[0])


def check_results(path: Path, n: int) -> dict[str, Any]:
    """What results.jsonl says of the n frames: every line valid JSON, one per frame, every bad
    frame recorded with an error and every good one with a verdict."""
    lines = path.read_bytes().split(b"\n")
    complete = lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]
    by_kind: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    misplaced = []
    for record in records:
        kind = kind_of(int(record["name"]))
        bad = kind not in ("normal", "defective")
        if bad != ("error" in record):
            misplaced.append(record["name"])
        outcome = "error" if "error" in record else ("failed" if record["failed"] else
                                                      "defect" if record["defect"] else "ok")
        by_kind[kind][outcome] += 1
    names = [r["name"] for r in records]
    return {"lines": len(records), "ends_with_newline": complete, "unique_names": len(set(names)),
            "outcomes_by_kind": {k: dict(v) for k, v in by_kind.items()},
            "frames_recorded_wrongly": misplaced[:20], "frames_recorded_wrongly_count": len(misplaced),
            "every_frame_accounted": complete and len(records) == n and len(set(names)) == n and not misplaced}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eproj/models/brick-l2ae.pt")
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=128, help="frame side in pixels (one tile of the brick model)")
    parser.add_argument("--pool", type=int, default=32, help="distinct normal and defective crops")
    parser.add_argument("--sample-every", type=int, default=500, help="frames between RSS samples")
    parser.add_argument("--max-slope", type=float, default=256.0,
                        help="the bound: RSS growth over the second half, in bytes per frame")
    parser.add_argument("--max-iters", type=int, default=10,
                        help="the projection's iteration cap (the bundle's is 100): the soak is about memory, "
                             "and a low cap lets 10,000 frames finish in minutes on two busy cores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.frames < 4 * args.sample_every:
        parser.error(f"--frames must be at least 4 x --sample-every ({4 * args.sample_every}) for a slope")

    from eproj.export.onnx_graphs import export_bundle
    from eproj.runtime import Inspector
    from eproj.runtime.cli import RESULTS, run_stream
    from eproj.runtime.sources import Source

    load_before = os.getloadavg()
    pools = brick_pools(args.side, args.pool, args.seed)
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        bundle, out = Path(work) / "bundle", Path(work) / "out"
        export_bundle(args.model, bundle)
        with Inspector.from_bundle(bundle, backend="onnxruntime", device="cpu", threads=args.threads,
                                   max_iters=args.max_iters) as inspector:
            note = inspector.backend_note
            started = time.perf_counter()
            source = Source(f"soak ({args.frames} frames from memory)", args.frames,
                            lambda: frames(args.frames, pools, args.side, samples, args.sample_every, started))
            counts = run_stream(inspector, source, out, progress=True, restart=True)
            seconds = time.perf_counter() - started
            samples.append({"frame": args.frames, "rss_bytes": rss_bytes(), "seconds": seconds})
        results = check_results(out / RESULTS, args.frames)
    half = args.frames // 2
    slope = fit_slope(samples, half)
    passed = slope <= args.max_slope and results["every_frame_accounted"]
    report = {
        "command": "python " + shlex.join(sys.argv),
        "machine": {"cores_visible": os.cpu_count(), "threads": args.threads, "load_average_before": load_before,
                    "load_average_after": os.getloadavg(), "python": sys.version.split()[0]},
        "runtime": note, "max_iters": args.max_iters,
        "frames": {"count": args.frames, "side": args.side, "mix_per_100_frames": dict(Counter(kind_of(i)
                                                                                                  for i in range(100))),
                   "normal_and_defective": f"{args.pool} crops each of skimage.data.brick(), seed {args.seed}"},
        "run_stream_counts": counts,
        "results_jsonl": results,
        "seconds": seconds, "frames_per_s": args.frames / seconds,
        "rss": {"samples": samples, "start_bytes": samples[0]["rss_bytes"], "end_bytes": samples[-1]["rss_bytes"],
                "max_bytes": max(s["rss_bytes"] for s in samples),
                "peak_ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "second_half_from_frame": half,
                "second_half_growth_bytes": samples[-1]["rss_bytes"] - next(s for s in samples
                                                                            if s["frame"] >= half)["rss_bytes"],
                "slope_bytes_per_frame_second_half": slope},
        "bound": {"max_slope_bytes_per_frame": args.max_slope,
                  "rule": "pass when the least-squares slope of RSS over the second half is at most the bound and "
                          "results.jsonl accounts for every frame (one valid line each; bad frames with an error)"},
        "passed": passed,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    mb = 1 / (1 << 20)
    print(f"soak: {args.frames} frames in {seconds:.0f} s ({args.frames / seconds:.1f}/s); RSS "
          f"{report['rss']['start_bytes'] * mb:.1f} -> {report['rss']['end_bytes'] * mb:.1f} MiB; second-half slope "
          f"{slope:.1f} B/frame (bound {args.max_slope:g}); every frame accounted: "
          f"{results['every_frame_accounted']}; {'PASS' if passed else 'FAIL'}; wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
