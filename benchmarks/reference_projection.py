"""Cost of the reference (PyTorch eager, CPU) pieces of one projection, as JSON.

For a model family at batch sizes 1 and 16 it times, in one run:
- ``forward``: the plain reconstruction f(x), the baseline method's whole cost;
- ``iteration``: one projection iteration (f(x), Lr, grad_x E by autograd, Hadamard step);
- ``dssim``: the DSSIM map between x0 and the result.

It also reports ``iteration / forward`` and ``dssim / forward``, the ratios the
later export and runtime stages are measured against.

    python benchmarks/reference_projection.py --family l2ae --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from eproj.train.losses import dssim_map
from eproj.train.models import ModelConfig, build_model
from eproj.train.projection import ProjectionConfig, loss_terms, update_step


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="l2ae", choices=("l2ae", "dsae", "vae", "gvae"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(ModelConfig(family=args.family, size=args.size)).eval()
    config = ProjectionConfig()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x0 = torch.rand(batch, 1, args.size, args.size)
        x = (x0 + 0.05 * torch.randn_like(x0)).clamp(0.0, 1.0)
        active = torch.ones(batch, dtype=torch.bool)
        iterations = torch.zeros(batch, dtype=torch.int64)

        def forward() -> None:
            with torch.no_grad():
                model(x0)

        def iteration() -> None:
            loss, reconstruction, grad_lr = loss_terms(model, x)
            update_step(x, x0, reconstruction, grad_lr, loss, active, iterations, config)

        def dssim() -> None:
            with torch.no_grad():
                dssim_map(x0, x0.flip(-1))

        t_forward = _time(forward, args.repeats)
        t_iteration = _time(iteration, args.repeats)
        t_dssim = _time(dssim, args.repeats)
        rows.append({"batch": batch, "forward_ms": 1e3 * t_forward, "iteration_ms": 1e3 * t_iteration,
                     "dssim_ms": 1e3 * t_dssim, "iteration_over_forward": t_iteration / t_forward,
                     "dssim_over_forward": t_dssim / t_forward})
    result = {"benchmark": "reference_projection", "family": args.family, "size": args.size,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
