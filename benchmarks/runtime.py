"""The runtime against the PyTorch eager-autograd reference, same work, one run, as JSON.

Exports a shipped model to a temporary bundle and runs ``eproj bench`` on it
(``eproj.runtime.bench``): every frame takes exactly ``--iters`` iterations on
both sides.

    python benchmarks/runtime.py --json benchmarks/results/runtime_cpu.json
    python benchmarks/runtime.py --backend torch --device cuda --batches 1,32 --json benchmarks/results/runtime_cuda.json
    python benchmarks/runtime.py --backend openvino --json /tmp/runtime_openvino.json
"""

from __future__ import annotations

import argparse
import json
import tempfile

from eproj.export.onnx_graphs import export_bundle
from eproj.benchmarking import eager_reference
from eproj.runtime.bench import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eproj/models/brick-l2ae.pt")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        export_bundle(args.model, folder)
        result = bench(folder, backend=args.backend, device=args.device,
                       batches=tuple(int(b) for b in args.batches.split(",")), iters=args.iters,
                       repeats=args.repeats, reference=eager_reference,
                       threads=args.threads if args.backend in ("onnxruntime", "openvino") else None)
    result["bundle"] = f"{args.model} exported to a temporary bundle"
    text = json.dumps(result, indent=2)
    with open(args.json, "w") as f:
        f.write(text + "\n")
    for row in result["rows"]:
        print(f"batch {row['batch']}: runtime p50 {row['p50_ms']:.1f} ms, reference p50 "
              f"{row['reference_eager_autograd']['p50_ms']:.1f} ms, {row['speedup_vs_reference']:.2f}x, "
              f"{row['fps']:.1f} frames/s, {100 * row['share_outside_network']:.0f}% outside the network")


if __name__ == "__main__":
    main()
