"""Full frames through ``Inspector`` on the CPU against the eager-autograd reference, one run, as JSON.

A 1024 x 1024 grayscale frame (scikit-image's 512 x 512 brick scaled up twice, so the
inspector is told ``scale`` 0.5 to bring it back to the scale the model learned), once
normal and once with a seeded defect from ``eproj.train.defects``, goes through the
shipped brick model exported to a bundle:

- with the bundle's own stop criterion ("bundle"), and with ``--max-iters`` /
  ``--stop-threshold`` (default 100 and the training-set minimum of Lr, the rule every
  tile ran under before calibrated stops; no zero-iteration gate) ("override");
- for each, the runtime (ONNX Runtime and the fused kernels) and the PyTorch eager
  autograd reference (``eproj.train.projection.project`` and the torch DSSIM map on the
  same tiles, blended the same way), with frames per second, the runtime's per-stage
  split, and the iterations per tile each side took.

It also counts the step graph's FLOPs from the ONNX graph (Conv, ConvTranspose, MatMul,
Gemm), times the step graph alone at batch 1 and 16, and a large SGEMM in torch on the
same threads, and reports the step's GFLOP/s against that measured peak.

    python benchmarks/full_frame.py --json benchmarks/results/full_frame_cpu.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def brick_frames(side: int, seed: int) -> dict[str, Any]:
    """The brick texture scaled up to ``side`` x ``side`` uint8, normal and with one seeded
    defect (drawn on a 128 x 128 region of the 512 x 512 texture, then scaled up with it)."""
    from skimage import data

    from eproj.train.defects import add_defect

    brick = data.brick().astype(np.float32)[:, :, None] / 255.0
    foreign = [cv2.resize(getattr(data, name)().astype(np.float32) / 255.0, (512, 512),
                          interpolation=cv2.INTER_AREA)[:, :, None] for name in ("grass", "gravel")]
    rng = np.random.default_rng(seed)
    y, x = (int(v) for v in rng.integers(64, 512 - 192, 2))
    crop, mask, kind = add_defect(rng, brick[y:y + 128, x:x + 128], [f[:128, :128] for f in foreign])
    defective = brick.copy()
    defective[y:y + 128, x:x + 128] = crop
    defect_mask = np.zeros((512, 512), np.uint8)
    defect_mask[y:y + 128, x:x + 128] = mask

    def scaled(image: np.ndarray) -> np.ndarray:
        up = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
        return np.clip(up * 255.0 + 0.5, 0, 255).astype(np.uint8)

    return {"frames": {"normal": scaled(brick), "defect": scaled(defective)},
            "defect": {"kind": kind, "at_512": [y, x], "pixels_at_512": int(defect_mask.sum()),
                       "mask": cv2.resize(defect_mask, (side, side), interpolation=cv2.INTER_NEAREST) > 0}}


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _iterations(per_tile: list[int]) -> dict[str, Any]:
    values = np.asarray(per_tile)
    return {"tiles": int(values.size), "mean": float(values.mean()), "min": int(values.min()),
            "max": int(values.max()), "sum": int(values.sum()),
            "histogram": {str(k): int(v) for k, v in sorted(Counter(values.tolist()).items())}}


def time_runtime(inspector: Any, frame: np.ndarray, repeats: int, defect_mask: np.ndarray | None) -> dict[str, Any]:
    """``repeats`` calls after a warm-up on a corner of the frame that makes a full batch of
    16 tiles: p50 and frames/s, per-stage medians, and what the last call gave (iterations
    per tile, stop reasons, score, verdict)."""
    side = int(np.ceil((inspector.bundle.size * 2.5) / inspector.scale))
    inspector(np.ascontiguousarray(frame[:side, :side]))
    totals, stages, result = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = inspector(frame)[0]
        totals.append(1e3 * (time.perf_counter() - start))
        stages.append(result.timings)
    assert result is not None
    p50 = _median(totals)
    row = {"p50_ms": p50, "frames_per_s": 1e3 / p50, "calls_ms": totals,
           "stages_ms": {k: _median([s[k] for s in stages]) for k in stages[0]},
           "iterations_per_tile": _iterations(result.tile_iterations),
           "stop_reasons": dict(Counter(result.stop_reasons)),
           "score": result.score, "defect": result.defect, "reason": result.reason,
           "flagged_pixels": float(result.mask.mean())}
    if defect_mask is not None:
        row["defect_pixels_flagged"] = float(result.mask[defect_mask].mean())
    row["_map"] = result.anomaly_map
    return row


def time_reference(inspector: Any, frame: np.ndarray, repeats: int, model: Any) -> dict[str, Any]:
    """The same projection with eager autograd on the inspector's tiles, parameters and gate:
    tiles laid out by ``eproj.runtime.frames``, ``project``, the torch DSSIM map, the blend."""
    import torch

    from eproj.runtime.frames import at_frame_size, stitch, to_batch
    from eproj.train.losses import dssim_map
    from eproj.train.projection import project

    gate = getattr(inspector, "gate_lr", None)
    gate = None if gate is None or not np.isfinite(gate) else float(gate)

    def once() -> tuple[np.ndarray, list[int]]:
        x0, layouts, _ = to_batch(frame, inspector.bundle.size, inspector.bundle.channels, inspector.fit,
                                  inspector.channel_order, None, inspector.scale, inspector.tile_stride)
        x = torch.from_numpy(x0)
        result = project(model, x, inspector.config, gate_threshold=gate)
        with torch.no_grad():
            dssim = dssim_map(x, result.projection).reshape(len(x0), x0.shape[2], x0.shape[3]).numpy()
        blended = at_frame_size(stitch(dssim, layouts[0]), layouts[0])
        _ = blended > inspector.pixel_threshold
        return blended, result.iterations.tolist()

    calls, iterations, blended = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        blended, iterations = once()
        calls.append(1e3 * (time.perf_counter() - start))
    p50 = _median(calls)
    return {"p50_ms": p50, "frames_per_s": 1e3 / p50, "calls_ms": calls,
            "iterations_per_tile": _iterations(iterations), "_map": blended,
            "gate_lr": gate}


def step_flops(step_path: Path) -> dict[str, Any]:
    """Multiply-add FLOPs (2 per multiply-add) of one sample through the step graph, from
    the shapes ONNX shape inference gives with the batch fixed to 1."""
    import onnx

    model = onnx.load(str(step_path))
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    by_op: Counter[str] = Counter()
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":  # the weights' dimensions after the first are per group
            out, weight = shapes[node.output[0]], shapes[node.input[1]]  # weight (Cout, Cin/g, kh, kw)
            by_op["Conv"] += 2 * int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type == "ConvTranspose":
            inp, weight = shapes[node.input[0]], shapes[node.input[1]]  # weight (Cin, Cout/g, kh, kw)
            by_op["ConvTranspose"] += 2 * int(np.prod(inp)) * int(np.prod(weight[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            k = a[-2] if node.op_type == "Gemm" and attrs.get("transA", 0) else a[-1]
            by_op[node.op_type] += 2 * int(np.prod(out)) * int(k)
    return {"per_sample": int(sum(by_op.values())), "by_op": dict(by_op)}


def time_step_graph(step_path: Path, tiles: np.ndarray, threads: int, batches: tuple[int, ...],
                    flops: int, repeats: int = 20) -> list[dict[str, Any]]:
    """The step graph alone in ONNX Runtime (CPU, ``threads`` intra-op threads) on the frame's
    first tiles: median ms per call, as the runtime's sessions run it and with denormals
    flushed to zero (``session.set_denormal_as_zero``), which the runtime does not set."""
    import onnxruntime as ort

    rows = []
    for flush in (False, True):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.set_denormal_as_zero", "1" if flush else "0")
        session = ort.InferenceSession(str(step_path), options, providers=["CPUExecutionProvider"])
        for batch in batches:
            x = np.ascontiguousarray(np.resize(tiles, (batch,) + tiles.shape[1:]))
            for _ in range(3):
                session.run(None, {"x": x})
            calls = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, {"x": x})
                calls.append(time.perf_counter() - start)
            seconds = _median(calls)
            rows.append({"batch": batch, "denormals_as_zero": flush, "ms": 1e3 * seconds,
                         "gflop_per_s": flops * batch / seconds / 1e9})
    return rows


def sgemm_peak(threads: int, n: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """FP32 SGEMM in torch (n x n times n x n) on ``threads`` threads: the best GFLOP/s of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"n": n, "threads": threads, "best_s": best, "gflop_per_s": 2 * n ** 3 / best / 1e9,
            "measured_with": f"torch {torch.__version__} torch.mm float32"}


def _with_overrides(from_bundle: Any, max_iters: int, stop_threshold: float) -> dict[str, Any]:
    """The options of the "override" rows: the iteration cap and stop threshold, and no
    zero-iteration gate where this eproj's Inspector has one."""
    options: dict[str, Any] = {"max_iters": max_iters, "stop_threshold": stop_threshold}
    if "gate_lr" in inspect.signature(from_bundle).parameters:
        options["gate_lr"] = float("-inf")
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eproj/models/brick-l2ae.pt")
    parser.add_argument("--side", type=int, default=1024, help="frame side in pixels")
    parser.add_argument("--scale", type=float, default=0.5,
                        help="the inspector's working scale (the frame is the brick scaled up 1024/512)")
    parser.add_argument("--tile-stride", type=int, default=None, help="default: the runtime's (half a tile)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runtime calls per row after one warm-up")
    parser.add_argument("--reference-repeats", type=int, default=1, help="reference calls per row")
    parser.add_argument("--max-iters", type=int, default=100, help="the override rows' iteration cap")
    parser.add_argument("--stop-threshold", type=float, default=None,
                        help="the override rows' stop threshold (default: the bundle's training-set minimum of Lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    import torch

    from eproj.export.onnx_graphs import export_bundle
    from eproj.runtime import Inspector
    from eproj.runtime.frames import to_batch
    from eproj.train.checkpoint import load_model

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    made = brick_frames(args.side, args.seed)
    out: dict[str, Any] = {"command": "python " + shlex.join(sys.argv),
        "machine": {"cpu": cpu_name(), "cores_visible": os.cpu_count(),
                    "threads": args.threads, "load_average_before": load_before},
        "reference_settings": "torch eager autograd, torch.set_num_threads(threads)",
        "frame": {"side": args.side, "channels": 1, "dtype": "uint8",
                  "source": "skimage.data.brick() (512 x 512) scaled up by cubic interpolation",
                  "defect": {k: v for k, v in made["defect"].items() if k != "mask"}, "seed": args.seed},
        "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        export_bundle(args.model, folder)
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        model = load_model(Path(folder) / manifest["weights"]["file"]).model.float().eval()
        training_min = float(manifest["lr_stats"]["min"])
        stop_threshold = training_min if args.stop_threshold is None else args.stop_threshold
        common = {"backend": "onnxruntime", "device": "cpu", "threads": args.threads, "scale": args.scale,
                  "tile_stride": args.tile_stride}
        settings = {"bundle": {},
                    "override": _with_overrides(Inspector.from_bundle, args.max_iters, stop_threshold)}
        out["bundle"] = {"model": args.model, "input": manifest["input"], "stop_threshold": manifest["stop_threshold"],
                         "stop_rule": manifest.get("stop_rule", "training-min (this bundle names none)"),
                         "lr_training_min": training_min}
        measured: dict[str, str] = {}  # the settings' effective projection -> the setting measured with it
        for name, options in settings.items():
            with Inspector.from_bundle(folder, **common, **options) as inspector:
                config = inspector.config
                effective = repr((config, getattr(inspector, "gate_lr", None)))
                if effective in measured:  # the bundle's own criterion is the override's: measured once
                    out["rows"] += [{**row, "setting": name, "options": dict(options), "same_as": measured[effective]}
                                    for row in out["rows"] if row["setting"] == measured[effective]]
                    print(f"{name:>8}: the same projection as {measured[effective]}", flush=True)
                    continue
                measured[effective] = name
                for frame_name, frame in made["frames"].items():
                    mask = made["defect"]["mask"] if frame_name == "defect" else None
                    runtime = time_runtime(inspector, frame, args.repeats, mask)
                    reference = time_reference(inspector, frame, args.reference_repeats, model)
                    difference = float(np.abs(runtime.pop("_map") - reference.pop("_map")).max())
                    row = {"setting": name, "frame": frame_name,
                           "options": {k: v for k, v in options.items()},
                           "projection": {"max_iters": config.max_iters, "stop_threshold": config.stop_threshold,
                                          "energy_tol": config.energy_tol, "alpha": config.alpha, "lam": config.lam},
                           "scale": inspector.scale, "tile_stride": inspector.tile_stride,
                           "runtime": runtime, "reference_eager_autograd": reference,
                           "speedup_vs_reference": reference["p50_ms"] / runtime["p50_ms"],
                           "map_max_abs_difference_vs_reference": difference}
                    out["rows"].append(row)
                    print(f"{name:>8} {frame_name:>6}: runtime {runtime['p50_ms']:8.1f} ms "
                          f"({runtime['frames_per_s']:.2f} frames/s, {runtime['iterations_per_tile']['mean']:.1f} "
                          f"iterations/tile), reference {reference['p50_ms']:8.1f} ms "
                          f"({reference['iterations_per_tile']['mean']:.1f}), "
                          f"{row['speedup_vs_reference']:.2f}x", flush=True)
        step_path = Path(folder) / manifest["graphs"]["step"]["file"]
        flops = step_flops(step_path)
        tiles, _, _ = to_batch(made["frames"]["normal"], manifest["input"]["size"], manifest["input"]["channels"],
                               "tile", scale=args.scale, stride=args.tile_stride)
        steps = time_step_graph(step_path, tiles, args.threads, (1, 16), flops["per_sample"])
    peak = sgemm_peak(args.threads)
    for row in steps:
        row["fraction_of_sgemm_peak"] = row["gflop_per_s"] / peak["gflop_per_s"]
    in_loop = []
    for row in out["rows"]:
        work = flops["per_sample"] * row["runtime"]["iterations_per_tile"]["sum"]
        seconds = row["runtime"]["stages_ms"]["iterations"] / 1e3
        if work and seconds > 0:
            in_loop.append({"setting": row["setting"], "frame": row["frame"], "gflop_per_s": work / seconds / 1e9,
                            "fraction_of_sgemm_peak": work / seconds / 1e9 / peak["gflop_per_s"]})
    out["step"] = {"flops": flops, "graph_alone": steps, "sgemm_peak": peak,
                   "in_loop": in_loop,
                   "in_loop_note": "one step-graph pass per tile-iteration counted; the loop's stop checks and "
                                   "updates are in the same time"}
    out["machine"]["load_average_after"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text + "\n")
    for row in steps:
        print(f"step graph batch {row['batch']}{' (denormals as zero)' if row['denormals_as_zero'] else ''}: "
              f"{row['ms']:.2f} ms, {row['gflop_per_s']:.1f} GFLOP/s, "
              f"{100 * row['fraction_of_sgemm_peak']:.0f}% of the {peak['gflop_per_s']:.0f} GFLOP/s SGEMM peak")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
