"""One projection step: ONNX Runtime on step.onnx against PyTorch eager autograd, as JSON.

Both compute reconstruction, Lr and grad_x Lr for the same model and inputs in
one run. The ratio ``autograd_ms / onnxruntime_ms`` is above 1 where the
exported graph is faster.

    python benchmarks/step_onnx_vs_autograd.py --model eproj/models/brick-l2ae.pt --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from eproj.export.onnx_graphs import export_bundle
from eproj.train.checkpoint import load_model
from eproj.train.losses import reconstruction_loss


def _median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eproj/models/brick-l2ae.pt")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = load_model(args.model)
    model, cfg = trained.model, trained.config
    for p in model.parameters():
        p.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(trained, tmp)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(Path(tmp) / "step.onnx"), options, providers=["CPUExecutionProvider"])
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(batch).random((batch, cfg.channels, cfg.size, cfg.size)).astype(np.float32)

            def autograd() -> None:
                xt = torch.from_numpy(x).requires_grad_(True)
                loss, _ = reconstruction_loss(model, xt)
                torch.autograd.grad(loss.sum(), xt)

            def onnxruntime() -> None:
                session.run(None, {"x": x})

            t_autograd = _median_ms(autograd, args.repeats)
            t_ort = _median_ms(onnxruntime, args.repeats)
            rows.append({"batch": batch, "autograd_ms": t_autograd, "onnxruntime_ms": t_ort,
                         "autograd_over_onnxruntime": t_autograd / t_ort})
    result = {"benchmark": "step_onnx_vs_autograd", "model": args.model, "family": cfg.family,
              "threads": args.threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
              "machine": platform.machine(), "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
