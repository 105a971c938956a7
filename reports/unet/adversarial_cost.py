"""What the U-Net's adversarial term (--adv-weight, eproj.train.adversarial) costs per training step.

    .venv/bin/python reports/unet/adversarial_cost.py [--steps 10] [--threads 1]

Times, in CPU seconds of this process (``time.process_time``, so that other work on the
machine inflates it less than wall time), the puzzle-regime training step of the default
U-Net (w = 16, 128x128 gray, batch 8, brick crops) with and without the term, the same
batches for both, after two warm-up steps. Writes adversarial_cost.json beside itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def measure(steps: int, adv_weight: float) -> dict[str, float]:
    from eproj.train.adversarial import Adversary
    from eproj.train.data import load_source
    from eproj.train.models import ModelConfig, build_model
    from eproj.train.puzzle import permutation_kind
    from eproj.train.trainer import TrainConfig, _adversarial_step_loss, _step_loss

    config = TrainConfig(data="textures:brick", batch=8, lr=1e-3, regime="puzzle", adv_weight=adv_weight)
    source = load_source(config.data, size=128, seed=0)
    kind = permutation_kind(source.fit)
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="unet", width=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=1e-5)
    adversary = Adversary(1, 128) if adv_weight else None
    seconds = []
    for step in range(steps + 2):
        rng = np.random.default_rng([0, step])
        clean = source.train_batch(rng, config.batch)
        x = torch.from_numpy(clean)
        start = time.process_time()
        if adversary is None:
            loss, _ = _step_loss(model, x, clean, rng, config, 1.0, kind)
        else:
            loss, _, restored = _adversarial_step_loss(model, adversary, x, clean, rng, config, kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if adversary is not None:
            adversary.step(x, restored.detach())
        seconds.append(time.process_time() - start)
    timed = np.array(seconds[2:])
    return {"adv_weight": adv_weight, "steps": steps, "cpu_seconds_per_step_median": float(np.median(timed)),
            "cpu_seconds_per_step_mean": float(timed.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(args.steps, w) for w in (0.0, 0.02)]
    ratio = rows[1]["cpu_seconds_per_step_median"] / rows[0]["cpu_seconds_per_step_median"]
    out = {"command": f".venv/bin/python reports/unet/adversarial_cost.py --steps {args.steps} --threads {args.threads}",
           "torch_threads": args.threads, "rows": rows, "cost_ratio_median": ratio}
    path = Path(__file__).resolve().parent / "adversarial_cost.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
