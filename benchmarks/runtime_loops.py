"""Loops side by side against one loop, on the CPU, interleaved in one run, as JSON.

The ONNX Runtime backend splits a batch across ``threads`` loops, each on its
own thread with a one-thread session (``loops`` default). The alternative is one
loop whose session spreads every operator across the threads (``loops=1``).
Both run the same frames for exactly ``--iters`` iterations, alternating with the
PyTorch eager-autograd reference, ``--rounds`` times; the medians and the ratios
against the reference are written.

    python benchmarks/runtime_loops.py --json benchmarks/results/runtime_loops_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np

from eproj.export.onnx_graphs import export_bundle
from eproj.runtime import Inspector
from eproj.benchmarking import eager_reference
from eproj.runtime.bench import synthetic_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eproj/models/brick-l2ae.pt")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        export_bundle(args.model, folder)
        common = dict(backend="onnxruntime", threads=args.threads, max_iters=args.iters,
                      stop_threshold=float("-inf"), energy_tol=0.0, batch_size=max(args.batch, 1) * 64)
        sides = {"side_by_side": Inspector.from_bundle(folder, **common),
                 "one_loop": Inspector.from_bundle(folder, loops=1, **common)}
        frames = synthetic_frames(args.batch, sides["one_loop"].bundle.size, sides["one_loop"].bundle.channels,
                                  seed=args.batch)
        medians: dict[str, list[float]] = {name: [] for name in (*sides, "reference")}
        for _ in range(args.rounds):
            for name, inspector in sides.items():
                inspector(frames)  # warm-up of this round
                samples = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    inspector(frames)
                    samples.append(1e3 * (time.perf_counter() - start))
                medians[name].append(float(np.median(samples)))
            medians["reference"].append(eager_reference(sides["one_loop"], frames, 1, args.repeats)["p50_ms"])
    ref = np.asarray(medians["reference"])
    result = {
        "benchmark": "runtime_loops", "model": args.model, "batch": args.batch, "iterations": args.iters,
        "threads": args.threads, "rounds": args.rounds, "machine": platform.machine(),
        "backends": {name: inspector.backend_note for name, inspector in sides.items()},
        "median_ms": {name: float(np.median(v)) for name, v in medians.items()},
        "per_round_ms": medians,
        "speedup_vs_reference": {name: float(np.median(ref / np.asarray(medians[name]))) for name in sides},
    }
    with open(args.json, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    m, r = result["median_ms"], result["speedup_vs_reference"]
    print(f"batch {args.batch}: side by side {m['side_by_side']:.0f} ms ({r['side_by_side']:.2f}x), "
          f"one loop {m['one_loop']:.0f} ms ({r['one_loop']:.2f}x), reference {m['reference']:.0f} ms")


if __name__ == "__main__":
    main()
