"""The fused kernels against their baselines, as JSON.

CPU (NumPy arrays, the C++ kernels):
- ``dssim_map`` against scikit-image's full-map SSIM and against the reference
  (eproj.train.losses.dssim_map, PyTorch on the CPU) at 128, 256 and 1024 squared;
- ``update`` against the same step written as a NumPy expression, and against
  the reference update_step; ``eproj_ms`` includes the argument checks of each
  call, ``eproj_prepared_ms`` is a prepare_update call run again (the loop's case).

CUDA (torch CUDA tensors, the CUDA kernels), with ``--device cuda``:
- achieved memory bandwidth of both kernels as a fraction of the device's peak
  (from its memory clock and bus width, or --peak-gbps) and of a measured
  device-to-device copy, at 1024 squared x batch 16;
- ``dssim_map`` against the reference on the same GPU (a conv2d SSIM in torch)
  and against pytorch-msssim when it is installed.

Every ratio compares timings taken in the same run; each baseline's output is
checked against the kernel's before it is timed.

    python benchmarks/kernels.py --device cpu --json benchmarks/results/kernels_cpu.json
    python benchmarks/kernels.py --device cuda --json benchmarks/results/kernels_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Callable

import numpy as np
import torch
from skimage.metrics import structural_similarity

import eproj.cpp_ext as kernels
from eproj.config import ProjectionConfig
from eproj.train.losses import dssim_map as reference_dssim
from eproj.train.projection import update_step


def _median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return 1e3 * float(np.median(samples))


def _images(rng: np.random.Generator, n: int, c: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.random((n, c, size, size), dtype=np.float32)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    return x, y


def _update_state(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    x0 = rng.random((n, 1, size, size), dtype=np.float32)
    return {"x": np.clip(x0 + rng.normal(0, 0.05, x0.shape), 0, 1).astype(np.float32), "x0": x0,
            "reconstruction": rng.random(x0.shape, dtype=np.float32),
            "grad_lr": rng.normal(0, 1, x0.shape).astype(np.float32),
            "loss": rng.random(n, dtype=np.float32), "active": np.ones(n, dtype=bool),
            "iterations": np.zeros(n, np.int32)}


def _numpy_update(s: dict[str, np.ndarray], config: ProjectionConfig) -> tuple[np.ndarray, ...]:
    """The Hadamard-weighted plain step as one would write it in NumPy."""
    n = len(s["loss"])
    diff = s["x"] - s["x0"]
    g = (s["grad_lr"] + np.float32(config.lam) * np.sign(diff)) * (s["x"] - s["reconstruction"]) ** 2
    stepped = np.clip(s["x"] - np.float32(config.alpha) * g, config.value_min, config.value_max)
    x = np.where(s["active"][:, None, None, None], stepped, s["x"])
    return (x, np.abs(x - s["x0"]).reshape(n, -1).sum(1),
            s["loss"] + config.lam * np.abs(diff).reshape(n, -1).sum(1))


def cpu_rows(repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for size, n in ((128, 1), (128, 16), (256, 1), (1024, 1)):
        x, y = _images(rng, n, 1, size)
        got = kernels.dssim_map(x, y).map
        sk = np.stack([(1 - structural_similarity(x[i, 0], y[i, 0], data_range=1.0, gaussian_weights=True,
                                                  sigma=1.5, use_sample_covariance=False, full=True)[1]) / 2
                       for i in range(n)])
        assert np.abs(sk - got).max() < 1e-4
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        assert np.abs(reference_dssim(tx.double(), ty.double()).numpy() - got).max() < 1e-5
        t_kernel = _median_ms(lambda: kernels.dssim_map(x, y), repeats)
        t_skimage = _median_ms(lambda: [structural_similarity(x[i, 0], y[i, 0], data_range=1.0, gaussian_weights=True,
                                                              sigma=1.5, use_sample_covariance=False, full=True)
                                        for i in range(n)], max(3, repeats // 4))
        with torch.no_grad():
            t_reference = _median_ms(lambda: reference_dssim(tx, ty), max(3, repeats // 4))
        rows.append({"kernel": "dssim_map", "size": size, "batch": n, "eproj_ms": t_kernel, "skimage_ms": t_skimage,
                     "reference_torch_ms": t_reference, "speedup_vs_skimage": t_skimage / t_kernel,
                     "speedup_vs_reference": t_reference / t_kernel})

    config = ProjectionConfig()
    for size, n in ((128, 1), (128, 16), (256, 16), (1024, 1)):
        s = _update_state(rng, n, size)
        x_np, distance_np, energy_np = _numpy_update(s, config)
        work = {k: v.copy() for k, v in s.items()}
        distance, energy = kernels.update(work["x"], work["x0"], work["reconstruction"], work["grad_lr"],
                                          work["loss"], work["active"], work["iterations"], config=config)
        assert np.abs(work["x"] - x_np).max() <= 1e-6
        assert np.allclose(distance, distance_np, rtol=1e-5) and np.allclose(energy, energy_np, rtol=1e-5)
        t = {k: torch.from_numpy(v) for k, v in s.items()}
        t_kernel = _median_ms(lambda: kernels.update(work["x"], work["x0"], work["reconstruction"], work["grad_lr"],
                                                     work["loss"], work["active"], work["iterations"],
                                                     config=config, distance=distance, energy=energy), repeats)
        prepared = kernels.prepare_update(work["x"], work["x0"], work["reconstruction"], work["grad_lr"],
                                          work["loss"], work["active"], work["iterations"], config=config)
        t_prepared = _median_ms(prepared, repeats)
        t_numpy = _median_ms(lambda: _numpy_update(s, config), repeats)
        t_reference = _median_ms(lambda: update_step(t["x"], t["x0"], t["reconstruction"], t["grad_lr"], t["loss"],
                                                     t["active"], t["iterations"], config), repeats)
        rows.append({"kernel": "update", "size": size, "batch": n, "eproj_ms": t_kernel,
                     "eproj_prepared_ms": t_prepared, "numpy_ms": t_numpy, "reference_torch_ms": t_reference,
                     "speedup_vs_numpy": t_numpy / t_kernel, "prepared_speedup_vs_numpy": t_numpy / t_prepared,
                     "speedup_vs_reference": t_reference / t_kernel})
    return rows


def _peak_gbps() -> float | None:
    """Theoretical DRAM bandwidth from the memory clock (kHz) and bus width (bits), via cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    device = torch.cuda.current_device()
    err, clock_khz = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrMemoryClockRate, device)
    err2, bus_bits = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrGlobalMemoryBusWidth, device)
    if err != cudart.cudaError_t.cudaSuccess or err2 != cudart.cudaError_t.cudaSuccess or not clock_khz:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def cuda_rows(repeats: int, peak_gbps: float | None) -> tuple[list[dict], dict]:
    reason = kernels.cuda_unavailable_reason()
    if reason or not torch.cuda.is_available():
        raise SystemExit(f"no CUDA here: {reason or 'torch has no CUDA'}")
    sync = torch.cuda.synchronize
    stream = torch.cuda.current_stream().cuda_stream
    peak = peak_gbps or _peak_gbps()
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(big)
    copy_ms = _median_ms(lambda: other.copy_(big), repeats, sync)
    copy_gbps = 2 * big.numel() / (copy_ms * 1e-3) / 1e9
    device = {"gpu": torch.cuda.get_device_name(), "peak_gbps": peak, "copy_gbps": copy_gbps}
    rows = []
    rng = np.random.default_rng(0)
    n, size = 16, 1024

    for c in (1, 3):
        x_np, y_np = _images(rng, n, c, size)
        x, y = torch.from_numpy(x_np).cuda(), torch.from_numpy(y_np).cuda()
        out = torch.empty(n, size, size, device="cuda")
        mask = torch.empty(n, size, size, dtype=torch.uint8, device="cuda")

        def fused() -> None:
            kernels.dssim_map(x, y, threshold=0.1, out=out, mask=mask, stream=stream)

        fused()
        sync()
        assert (out.cpu().numpy() - reference_dssim(x.double(), y.double()).cpu().numpy()).__abs__().max() < 1e-5
        t_kernel = _median_ms(fused, repeats, sync)
        with torch.no_grad():
            t_reference = _median_ms(lambda: reference_dssim(x, y), repeats, sync)
        row = {"kernel": "dssim_map", "size": size, "batch": n, "channels": c, "eproj_ms": t_kernel,
               "reference_torch_conv2d_ms": t_reference, "speedup_vs_reference": t_reference / t_kernel}
        try:
            from pytorch_msssim import ssim as msssim_ssim

            t_msssim = _median_ms(lambda: msssim_ssim(x, y, data_range=1.0, size_average=False), repeats, sync)
            row.update(pytorch_msssim_ms=t_msssim, speedup_vs_pytorch_msssim=t_msssim / t_kernel)
        except ImportError:
            row["pytorch_msssim"] = "not installed"
        moved = n * size * size * (2 * c * 4 + 4 + 1)  # read x and y, write the map and the mask
        row.update(bytes=moved, gbps=moved / (t_kernel * 1e-3) / 1e9)
        rows.append(row)

    config = ProjectionConfig()
    for step in ("plain", "adam"):
        s = _update_state(rng, n, size)
        d = {k: torch.from_numpy(v).cuda() for k, v in s.items()}
        m = torch.zeros_like(d["x"]) if step == "adam" else None
        v = torch.zeros_like(d["x"]) if step == "adam" else None
        distance = torch.empty(n, device="cuda")
        energy = torch.empty(n, device="cuda")
        cfg = config.with_(step=step, alpha=0.01 if step == "adam" else 0.5)

        def fused_update() -> None:
            kernels.update(d["x"], d["x0"], d["reconstruction"], d["grad_lr"], d["loss"], d["active"],
                           d["iterations"], config=cfg, m=m, v=v, distance=distance, energy=energy, stream=stream)

        t_kernel = _median_ms(fused_update, repeats, sync)
        t = {k: val.long() if k == "iterations" else val for k, val in d.items()}
        t_reference = _median_ms(lambda: update_step(t["x"], t["x0"], t["reconstruction"], t["grad_lr"], t["loss"],
                                                     t["active"], t["iterations"], cfg, None, m, v), repeats, sync)
        arrays = 5 if step == "plain" else 9  # read x, x0, f(x), grad, write x (+ read and write m, v)
        moved = n * size * size * 4 * arrays
        rows.append({"kernel": "update", "step": step, "size": size, "batch": n, "eproj_ms": t_kernel,
                     "reference_torch_ms": t_reference, "speedup_vs_reference": t_reference / t_kernel,
                     "bytes": moved, "gbps": moved / (t_kernel * 1e-3) / 1e9})
    for row in rows:
        row["fraction_of_copy"] = row["gbps"] / copy_gbps
        if peak:
            row["fraction_of_peak"] = row["gbps"] / peak
    return rows, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the reference (CPU)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="the GPU's peak DRAM bandwidth, if known")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "kernels", "device": args.device, "build": kernels.build_info(),
              "machine": platform.machine(), "torch": torch.__version__}
    if args.device == "cpu":
        result["rows"] = cpu_rows(args.repeats)
    else:
        result["rows"], result["gpu"] = cuda_rows(args.repeats, args.peak_gbps)
    text = json.dumps(result, indent=2)
    with open(args.json, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
