"""Full frames through ``Inspector`` on the CPU against the eager-autograd reference, one run, as JSON.

A 1024 x 1024 grayscale frame (scikit-image's 512 x 512 brick scaled up twice, so the
inspector is told ``scale`` 0.5 to bring it back to the scale the model learned), once
normal and once with a seeded defect from ``eproj.train.defects``, goes through the
shipped brick model exported to a bundle:

- with the bundle's own stop criterion ("bundle"), the same with a zero-iteration gate
  that takes no step (``gate_first_update=False``: a gated tile costs one forward pass;
  "no-step gate"), and with ``--max-iters`` /
  ``--stop-threshold`` (default 100 and the training-set minimum of Lr, the rule every
  tile ran under before calibrated stops; no zero-iteration gate) ("override");
- for each, the runtime (the fused kernels with the step graph on ONNX Runtime, and on
  OpenVINO where it is installed) and the PyTorch eager autograd reference
  (``eproj.train.projection.project`` and the runtime's maps, ``projection_maps``, on the
  same tiles, blended the same way), with frames per second, the runtime's per-stage
  split, and the iterations per tile each side took;
- ``--levers``: the runtime alone (no reference) with the bundle's criterion at other tile
  strides and batch sizes (all the frame's tiles in one batch), frames/s and iterations.

It also counts the step graph's FLOPs from the ONNX graph (Conv, ConvTranspose, MatMul,
Gemm), times the step graph alone in ONNX Runtime and in OpenVINO (its shared weights
untied, as the openvino backend runs it), called in turn, at batch 1 and 16 on 1 and
``--threads`` threads, with the process's CPU seconds per call (the share of the cores it
got on a shared machine), and a large SGEMM in torch on the same threads, and reports each
engine's GFLOP/s against that measured peak.

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
    tiles laid out by ``eproj.runtime.frames``, ``project``, the torch maps as the runtime
    forms them (``projection_maps``), the blend."""
    import torch

    from eproj.runtime.frames import at_frame_size, stitch, to_batch
    from eproj.train.evaluate import projection_maps
    from eproj.train.projection import project

    gate = getattr(inspector, "gate_lr", None)
    gate = None if gate is None or not np.isfinite(gate) else float(gate)

    def once() -> tuple[np.ndarray, list[int]]:
        x0, layouts, _ = to_batch(frame, inspector.bundle.size, inspector.bundle.channels, inspector.fit,
                                  inspector.channel_order, None, inspector.scale, inspector.tile_stride)
        x = torch.from_numpy(x0)
        result = project(model, x, inspector.config, gate_threshold=gate,
                         gate_rec_error=None if gate is None else inspector.gate_rec_error,
                         gate_first_update=inspector.gate_first_update)
        # the maps as the runtime forms them: a tile that took no step is mapped by its
        # reconstruction, and every map is put on one scale by its step count
        dssim = projection_maps(model, x, result.projection, result.iterations.numpy(),
                                inspector.decision.zero_iteration_map_scale, inspector.decision.map_scale)[0]
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


def step_engines(step_bytes: bytes, threads: int) -> dict[str, Any]:
    """name -> a call that runs the step graph on a batch ``x``: ONNX Runtime on the CPU as the
    runtime's sessions run it, the same with denormals flushed to zero (which the runtime does
    not set), and OpenVINO's CPU plugin in f32 on the untied graph as the openvino backend
    compiles it (left out where OpenVINO is not installed)."""
    import onnxruntime as ort

    engines: dict[str, Any] = {}
    for name, flush in (("onnxruntime", False), ("onnxruntime, denormals as zero", True)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.set_denormal_as_zero", "1" if flush else "0")
        session = ort.InferenceSession(step_bytes, options, providers=["CPUExecutionProvider"])
        engines[name] = lambda x, session=session: session.run(None, {"x": x})
    try:
        import openvino  # noqa: F401
    except ImportError:
        return engines
    from eproj.runtime.backends.openvino import compile_step, untied_graph_bytes

    compiled = compile_step(untied_graph_bytes(step_bytes)[0], threads)
    request = compiled.create_infer_request()
    engines["openvino"] = lambda x: request.infer({0: x})
    return engines


def time_step_graph(step_bytes: bytes, tiles: np.ndarray, threads: tuple[int, ...], batches: tuple[int, ...],
                    flops: int, repeats: int = 15) -> list[dict[str, Any]]:
    """The step graph alone on the frame's first tiles, in every engine of ``step_engines``,
    the engines called in turn (so a change in the machine's load reaches them alike): per
    engine, thread count and batch, the median ms per call, GFLOP/s, and the process's CPU
    seconds per wall second over the calls (``cores_used``: below ``threads`` where other
    jobs hold the cores)."""
    rows = []
    for count in threads:
        engines = step_engines(step_bytes, count)
        for batch in batches:
            x = np.ascontiguousarray(np.resize(tiles, (batch,) + tiles.shape[1:]))
            for run in engines.values():
                for _ in range(3):
                    run(x)
            calls: dict[str, list[float]] = {name: [] for name in engines}
            cpu: dict[str, float] = {name: 0.0 for name in engines}
            for _ in range(repeats if batch < 8 else max(3, repeats // 3)):
                for name, run in engines.items():
                    before, start = time.process_time(), time.perf_counter()
                    run(x)
                    calls[name].append(time.perf_counter() - start)
                    cpu[name] += time.process_time() - before
            for name in engines:
                seconds = _median(calls[name])
                rows.append({"engine": name, "threads": count, "batch": batch, "ms": 1e3 * seconds,
                             "gflop_per_s": flops * batch / seconds / 1e9,
                             "cores_used": cpu[name] / sum(calls[name])})
            base = next(r for r in rows if r["engine"] == "onnxruntime" and r["threads"] == count
                        and r["batch"] == batch)
            for row in rows[-len(engines):]:
                row["speedup_vs_onnxruntime"] = base["ms"] / row["ms"]
    return rows


def sgemm_peak(threads: int, n: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """FP32 SGEMM in torch (n x n times n x n) on ``threads`` threads: the best GFLOP/s of
    ``repeats``, and the process's CPU seconds per wall second over them (``cores_used``)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    best, wall, cpu = float("inf"), 0.0, 0.0
    for _ in range(repeats):
        before, start = time.process_time(), time.perf_counter()
        torch.mm(a, b)
        seconds = time.perf_counter() - start
        best, wall, cpu = min(best, seconds), wall + seconds, cpu + time.process_time() - before
    return {"n": n, "threads": threads, "best_s": best, "gflop_per_s": 2 * n ** 3 / best / 1e9,
            "cores_used": cpu / wall, "measured_with": f"torch {torch.__version__} torch.mm float32"}


def _with_overrides(from_bundle: Any, max_iters: int, stop_threshold: float) -> dict[str, Any]:
    """The options of the "override" rows: the iteration cap and stop threshold, and no
    zero-iteration gate where this eproj's Inspector has one."""
    options: dict[str, Any] = {"max_iters": max_iters, "stop_threshold": stop_threshold}
    if "gate_lr" in inspect.signature(from_bundle).parameters:
        options["gate_lr"] = float("-inf")
    return options


def _backends() -> list[str]:
    """The runtime backends measured: onnxruntime, and openvino where it is installed."""
    import importlib.util

    return ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


def _print_row(row: dict[str, Any]) -> None:
    runtime, reference = row["runtime"], row.get("reference_eager_autograd")
    line = (f"{row['setting']:>8} {row['frame']:>6} {row['backend']:>11}: {runtime['p50_ms']:8.1f} ms "
            f"({runtime['frames_per_s']:.2f} frames/s, {runtime['iterations_per_tile']['mean']:.1f} "
            f"iterations/tile of {runtime['iterations_per_tile']['tiles']})")
    if reference is not None:
        line += (f", reference {reference['p50_ms']:8.1f} ms ({reference['iterations_per_tile']['mean']:.1f}), "
                 f"{row['speedup_vs_reference']:.2f}x")
    print(line, flush=True)


def measure_levers(folder: str, made: dict[str, Any], common: dict[str, Any], strides: list[int],
                   batches: list[int], repeats: int) -> list[dict[str, Any]]:
    """The runtime alone with the bundle's criterion at each tile stride and batch size (0: all
    the frame's tiles in one batch), on each backend: frames/s, iterations, stop reasons."""
    from eproj.runtime import Inspector

    rows = []
    for backend in _backends():
        for stride in strides:
            for batch in batches:
                options = {**common, "backend": backend, "tile_stride": stride}
                with Inspector.from_bundle(folder, **options) as inspector:
                    tiles = len(inspector(made["frames"]["normal"])[0].tile_iterations)
                    inspector.batch_size = batch or tiles
                    for frame_name, frame in made["frames"].items():
                        mask = made["defect"]["mask"] if frame_name == "defect" else None
                        runtime = time_runtime(inspector, frame, repeats, mask)
                        runtime.pop("_map")
                        row = {"setting": "bundle", "frame": frame_name, "backend": backend,
                               "tile_stride": inspector.tile_stride, "batch_size": inspector.batch_size,
                               "runtime": runtime}
                        rows.append(row)
                        print(f"lever stride {inspector.tile_stride} batch {inspector.batch_size}: ", end="")
                        _print_row(row)
    return rows


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
    parser.add_argument("--levers", default="",
                        help="tile strides x batch sizes measured with the bundle's criterion, runtime only, "
                             "e.g. '64,128x16,0' (batch 0: all of a frame's tiles in one batch)")
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
    versions = {"onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__}
    if "openvino" in _backends():
        versions["openvino"] = __import__("openvino").get_version()
    out: dict[str, Any] = {"command": "python " + shlex.join(sys.argv),
        "machine": {"cpu": cpu_name(), "cores_visible": os.cpu_count(),
                    "threads": args.threads, "nice": os.nice(0), "load_average_before": load_before},
        "versions": versions,
        "reference_settings": "torch eager autograd, torch.set_num_threads(threads); timed once per setting and "
                              "frame, and compared with every backend's row",
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
        common = {"device": "cpu", "threads": args.threads, "scale": args.scale, "tile_stride": args.tile_stride}
        settings = {"bundle": {},
                    # the bundle's rule with a gate that takes no step: gated tiles cost one forward pass
                    "no-step gate": {"gate_first_update": False},
                    "override": _with_overrides(Inspector.from_bundle, args.max_iters, stop_threshold)}
        out["bundle"] = {"model": args.model, "input": manifest["input"], "stop_threshold": manifest["stop_threshold"],
                         "stop_rule": manifest.get("stop_rule", "training-min (this bundle names none)"),
                         "lr_training_min": training_min}
        measured: dict[str, str] = {}  # the settings' effective projection -> the setting measured with it
        for name, options in settings.items():
            references: dict[str, dict[str, Any]] = {}  # frame -> the reference, timed once for every backend
            for backend in _backends():
                with Inspector.from_bundle(folder, backend=backend, **common, **options) as inspector:
                    config = inspector.config
                    effective = repr((config, getattr(inspector, "gate_lr", None),
                                      getattr(inspector, "gate_first_update", None)))
                    if measured.get(effective, name) != name:  # the bundle's own criterion is the override's
                        out["rows"] += [{**row, "setting": name, "options": dict(options),
                                         "same_as": measured[effective]}
                                        for row in out["rows"] if row["setting"] == measured[effective]]
                        print(f"{name:>8}: the same projection as {measured[effective]}", flush=True)
                        break
                    measured[effective] = name
                    for frame_name, frame in made["frames"].items():
                        mask = made["defect"]["mask"] if frame_name == "defect" else None
                        runtime = time_runtime(inspector, frame, args.repeats, mask)
                        if frame_name not in references:
                            references[frame_name] = time_reference(inspector, frame, args.reference_repeats, model)
                        reference = dict(references[frame_name])
                        difference = float(np.abs(runtime.pop("_map") - reference.pop("_map")).max())
                        row = {"setting": name, "frame": frame_name, "backend": backend,
                               "backend_note": inspector.backend_note,
                               "options": {k: v for k, v in options.items()},
                               "projection": {"max_iters": config.max_iters, "stop_threshold": config.stop_threshold,
                                              "energy_tol": config.energy_tol, "alpha": config.alpha,
                                              "lam": config.lam},
                               "scale": inspector.scale, "tile_stride": inspector.tile_stride,
                               "runtime": runtime, "reference_eager_autograd": reference,
                               "speedup_vs_reference": reference["p50_ms"] / runtime["p50_ms"],
                               "map_max_abs_difference_vs_reference": difference}
                        out["rows"].append(row)
                        _print_row(row)
        if args.levers:
            strides, batches = ([int(v) for v in part.split(",")] for part in args.levers.split("x"))
            out["levers"] = measure_levers(folder, made, common, strides, batches, args.repeats)
        step_bytes = (Path(folder) / manifest["graphs"]["step"]["file"]).read_bytes()
        flops = step_flops(Path(folder) / manifest["graphs"]["step"]["file"])
        tiles, _, _ = to_batch(made["frames"]["normal"], manifest["input"]["size"], manifest["input"]["channels"],
                               "tile", scale=args.scale, stride=args.tile_stride)
        steps = time_step_graph(step_bytes, tiles, tuple(sorted({1, args.threads})), (1, 16), flops["per_sample"])
    peaks = {count: sgemm_peak(count) for count in sorted({row["threads"] for row in steps} | {args.threads})}
    torch.set_num_threads(args.threads)
    peak = peaks[args.threads]
    for row in steps:  # against the peak on the same number of threads
        row["fraction_of_sgemm_peak"] = row["gflop_per_s"] / peaks[row["threads"]]["gflop_per_s"]
    in_loop = []
    for row in out["rows"]:
        work = flops["per_sample"] * row["runtime"]["iterations_per_tile"]["sum"]
        seconds = row["runtime"]["stages_ms"]["iterations"] / 1e3
        if work and seconds > 0 and "same_as" not in row:
            in_loop.append({"setting": row["setting"], "frame": row["frame"], "backend": row["backend"],
                            "gflop_per_s": work / seconds / 1e9,
                            "fraction_of_sgemm_peak": work / seconds / 1e9 / peak["gflop_per_s"]})
    out["step"] = {"flops": flops, "graph_alone": steps, "sgemm_peak": peak,
                   "sgemm_peak_by_threads": {str(count): value for count, value in peaks.items()},
                   "graph_alone_note": "engines called in turn; cores_used: process CPU seconds per wall second "
                                       "(the share of the cores this process got; other jobs share the machine); "
                                       "fraction_of_sgemm_peak: against the SGEMM peak on the same threads",
                   "in_loop": in_loop,
                   "in_loop_note": "one step-graph pass per tile-iteration counted; the loop's stop checks and "
                                   "updates are in the same time"}
    out["machine"]["load_average_after"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text + "\n")
    for row in steps:
        print(f"step graph, {row['engine']}, {row['threads']} thread(s), batch {row['batch']}: {row['ms']:.2f} ms, "
              f"{row['gflop_per_s']:.1f} GFLOP/s, {100 * row['fraction_of_sgemm_peak']:.0f}% of the "
              f"{peaks[row['threads']]['gflop_per_s']:.0f} GFLOP/s SGEMM peak on as many threads, "
              f"{row['speedup_vs_onnxruntime']:.2f}x onnxruntime, "
              f"{row['cores_used']:.2f} cores used")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
