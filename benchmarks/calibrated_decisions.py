"""The calibrated stop rules and verdict against the old ones, on the shipped models' test sets.

For each model it exports a bundle and evaluates the projection on the test set of
its training data with the runtime (ONNX Runtime on the CPU and the fused kernels,
``eproj.runtime.Inspector``, as ``make demo`` does), once per setting:

- ``100 iterations``: every tile 100 steps, no stop, no gate: the quality reference the
  calibration's rule choice is held to;
- ``training-min``: the paper's rule, stop under the training-set minimum of Lr,
  at most 100 iterations, no gate (close to 100 iterations on brick; on grass the
  normal crops reach the minimum after about 20);
- ``validation``: the rule the calibration chose on validation data (gate, stop
  threshold, cap), as shipped;
- ``validation, no gate``: the same without the zero-iteration gate;
- ``1 iteration``: every tile one step (the cheapest projection), for comparison.

Every setting reports pixel AUROC, AUPRO, image AUROC of the calibrated image score
and of every candidate score (``dssim_max`` is the old score), mean iterations over
normal tiles, defective tiles and all tiles, the defective tiles the gate finished,
the verdict's true and false positive rates and the seconds. Nothing here chooses a
setting: the calibration did, on validation images (``eproj.train.calibrate``).

    python benchmarks/calibrated_decisions.py --threads 1 --out reports/calibrated-decisions
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from eproj.export.onnx_graphs import export_bundle
from eproj.files import write_atomic
from eproj.runtime import Inspector
from eproj.train.checkpoint import load_model
from eproj.train.evaluate import evaluate

MODELS = ("brick-l2ae", "grass-l2ae", "brick-vae", "grass-vae")
SETTINGS = {
    "validation": {"stop_rule": "validation"},
    "100 iterations": {"stop_rule": "training-min", "stop_threshold": -1.0, "max_iters": 100},
    "training-min": {"stop_rule": "training-min"},
    "1 iteration": {"stop_rule": "training-min", "max_iters": 1},
    "validation, no gate": {"stop_rule": "validation", "gate_lr": float("-inf")},
}


def run_setting(trained, bundle: Path, data: str, setting: dict, threads: int) -> dict:
    inspector = Inspector.from_bundle(bundle, backend="onnxruntime", method="projection", fit="none",
                                      channel_order="rgb", batch_size=48, threads=threads, **setting)
    start = time.perf_counter()
    report, results = evaluate(trained, data, "projection", progress=False, inspector=inspector,
                               stop_rule=setting["stop_rule"])
    seconds = time.perf_counter() - start
    inspector.close()
    m = report["metrics"]["dssim"]
    labels = np.array([r.sample.label for r in results])
    verdicts = np.array([r.defect for r in results])
    gated_defective = sum(reason == "gate" for r in results if r.sample.label == 1 for reason in r.stop_reasons)
    return {"setting": setting, "projection": report["projection"], "gate_lr": report["gate_lr"],
            "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro_0.3"], "image_auroc": m["image_auroc"],
            "image_score": report["image_score"], "image_auroc_per_score": report["metrics"]["image_scores"],
            "iterations_mean": report["iterations"]["mean"],
            "iterations_normal": report["iterations"]["mean_normal_tiles"],
            "iterations_defective": report["iterations"]["mean_defective_tiles"],
            "stop_reasons": report["iterations"]["stop_reasons"],
            "gated_defective_tiles": int(gated_defective),
            "verdict_tpr": float(verdicts[labels == 1].mean()), "verdict_fpr": float(verdicts[labels == 0].mean()),
            "unlike_normal": int(sum(r.reason == "unlike any normal frame" for r in results)),
            "seconds": seconds}


def markdown(payload: dict) -> str:
    lines = ["# Calibrated stop rules and verdict", "",
             "Made by " + ", ".join(f"`{c}`" for c in dict.fromkeys(payload["commands"].values()))
             + f" ({payload['machine']}). Runtime: ONNX Runtime on the CPU "
             f"with the fused kernels, {payload['threads']} thread(s). Every setting was fixed before this "
             "run; the `validation` rule, the gate and the image score were chosen on validation images "
             "by `eproj.train.calibrate` (recorded in each model's calibration).", "",
             "| model | setting | pixAUROC | AUPRO | imgAUROC (score) | imgAUROC max DSSIM | iters normal | "
             "iters defective | iters all | gated defective tiles | verdict TPR / FPR | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, entry in payload["models"].items():
        for setting, r in entry["settings"].items():
            lines.append(f"| {name} | {setting} | {f(r['pixel_auroc'])} | {f(r['aupro'])} | "
                         f"{f(r['image_auroc'])} ({r['image_score']}) | {f(r['image_auroc_per_score']['dssim_max'])} | "
                         f"{r['iterations_normal']:.1f} | {r['iterations_defective']:.1f} | "
                         f"{r['iterations_mean']:.1f} | {r['gated_defective_tiles']} | "
                         f"{r['verdict_tpr']:.2f} / {r['verdict_fpr']:.2f} | {r['seconds']:.1f} |")
    lines += ["", "## What each model's calibration chose (validation images only)", ""]
    for name, entry in payload["models"].items():
        cal = entry["calibration"]
        rule = cal["stop_rules"]["validation"]
        where = ("the training minimum" if rule["k"] is None
                 else f"the median Lr of normal validation crops after k = {rule['k']} iterations")
        gate = "no gate" if rule["gate_lr"] is None else f"gate Lr(x0) <= {rule['gate_lr']:.4g}"
        if rule["gate_lr"] is not None and rule.get("gate_rec_error") is not None:
            gate += f" and max (x0 - f(x0))^2 <= {rule['gate_rec_error']:.4g}"
        if rule["gate_lr"] is not None:
            gate += " (gated tiles keep the first update)" if rule.get("gate_first_update", True) else \
                " (gated tiles take no step: one forward pass)"
        lines.append(f"- **{name}**: stop rule `validation` = {gate}, stop at "
                     f"Lr <= {rule['stop_threshold']:.4g} ({where}), cap {rule['max_iters']}; image score "
                     f"`{cal['decision']['image_score']}` (validation AUROC "
                     + ", ".join(f"{k} {f(v)}" for k, v in cal['decision']['image_score_validation_auroc'].items())
                     + f"); min region {cal['decision']['min_region_area']} px; zero-iteration map scale "
                     f"{cal['decision']['zero_iteration_map_scale']:.3f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--models-dir", default="eproj/models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bundles", default="runs/calibrated-decisions", help="where the bundles are exported")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(args.threads, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(["benchmarks/calibrated_decisions.py", *sys.argv[1:]])
    payload = {"commands": {}, "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
               "threads": args.threads, "models": {}}
    if (out / "report.json").is_file():  # a run for other models adds to the report
        payload = json.loads((out / "report.json").read_text())
    for name in args.models.split(","):
        trained = load_model(Path(args.models_dir) / f"{name}.pt")
        data = trained.train["data"]
        bundle = Path(args.bundles) / name
        export_bundle(trained, bundle)
        settings: dict = {}
        cal = trained.calibration
        for label, setting in SETTINGS.items():  # the report is written after each setting
            print(f"{name}: {label}", flush=True)
            settings[label] = run_setting(trained, bundle, data, setting, args.threads)
            payload["commands"][name] = command
            payload["models"][name] = {"model": str(trained.path), "data": data, "settings": settings,
                                       "calibration": {k: cal[k] for k in ("stop_rule", "stop_rules", "decision",
                                                                            "stop_rule_selection")}}
            if (out / "report.json").is_file():  # runs for other models may have written meanwhile
                written = json.loads((out / "report.json").read_text())
                for key in ("commands", "models"):
                    payload[key] = {**written.get(key, {}), name: payload[key][name]}
            write_atomic(out / "report.json", json.dumps(payload, indent=2).encode())
            write_atomic(out / "report.md", markdown(payload).encode())
    print(markdown(payload))


if __name__ == "__main__":
    main()
