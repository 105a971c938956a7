"""The ``eproj`` command line.

Subcommands import their stage lazily, so the runtime's commands work where
torch is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eproj import __version__
from eproj.errors import EprojError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
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
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    _set_threads(args)
    architecture = args.arch or ("zimmerer" if args.size == 64 else "bergmann")
    model_config = ModelConfig(family=args.model, architecture=architecture, size=args.size,
                               channels=args.channels or _data_channels(args.data, args.size),
                               **_given(latent=args.latent, beta=args.beta,
                                        decoder_variance=args.decoder_variance))
    train_config = TrainConfig(data=args.data, **_given(steps=args.steps, batch=args.batch, lr=args.lr,
                                                        seed=args.seed, checkpoint_every=args.checkpoint_every,
                                                        weights=args.weights, kl_warmup=args.kl_warmup,
                                                        regime=args.regime, corruption=args.corruption))
    out = train(args.out, model_config, train_config, calibrate_after=not args.no_calibrate)
    print(f"wrote {out}")
    return 0


def _data_channels(spec: str, size: int) -> int:
    from eproj.train.data import load_source

    return load_source(spec, size=size).channels


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from eproj.train.calibrate import write_model

    _set_threads(args)
    print(f"wrote {write_model(args.run, data=args.data)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from eproj.train.evaluate import evaluate_cli

    threads = _set_threads(args)
    if args.method in PREDICTOR_METHODS:
        return _cmd_eval_maps(args, threads)
    report = evaluate_cli(args.run, args.data, args.method, args.json, args.save_maps,
                          max_iters=args.max_iters, alpha=args.alpha, lam=args.lam, step=args.step,
                          weighting=args.weighting, energy_tol=args.energy_tol,
                          stop_threshold=args.stop_threshold)
    print(json.dumps(report["metrics"]["dssim"], indent=2))
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
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from eproj.demo import run_demo

    run_demo(Path(args.out), retrain=args.train, steps=args.steps, threads=_set_threads(args))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
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


def _cmd_build_engine(args: argparse.Namespace) -> int:
    from eproj.export.tensorrt import build_engines

    for path in build_engines(args.bundle, fp16=args.fp16, min_batch=args.min_batch, opt_batch=args.opt_batch,
                              max_batch=args.max_batch, workspace_mb=args.workspace_mb, tf32=args.tf32):
        print(f"wrote {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
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
                   precision=args.precision, reference=None if args.no_reference else eager_reference)
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


def _runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a bundle folder (eproj export)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt"), default="auto",
                   help="auto: TensorRT, then torch on CUDA, then ONNX Runtime on the CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="for onnxruntime and torch")
    p.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                   help="onnxruntime and tensorrt [fp32]: fp16 runs step_fp16 (export --fp16) or an fp16 engine")
    p.add_argument("--method", choices=("projection", "reconstruction", "ensemble"), default="projection",
                   help="ensemble: the bundle's predictor ensemble (export --ensemble)")
    p.add_argument("--fit", choices=("none", "resize", "tile"), default=None, help="default: the bundle's")


def _projection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-iters", type=int, default=None, help="iteration cap (default: the bundle's)")
    p.add_argument("--alpha", type=float, default=None, help="step size")
    p.add_argument("--lam", type=float, default=None, help="weight of ||x - x0||_1")
    p.add_argument("--step", choices=("plain", "adam"), default=None)
    p.add_argument("--weighting", choices=("hadamard", "none"), default=None)
    p.add_argument("--energy-tol", type=float, default=None)
    p.add_argument("--stop-threshold", type=float, default=None, help="default: the bundle's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eproj", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"eproj {__version__}")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an autoencoder on normal images")
    p.add_argument("--data", required=True, help="textures:NAME|PATH, mvtec:PATH/CATEGORY or folder:PATH")
    p.add_argument("--model", required=True, choices=("l2ae", "dsae", "vae", "gvae"))
    # Options left unset keep the defaults of ModelConfig and TrainConfig (the values in brackets),
    # so that `eproj train` and `eproj demo --train` cannot drift apart.
    p.add_argument("--beta", type=float, default=None, help="KL weight of the vae family [1; 1 = VAE]")
    p.add_argument("--decoder-variance", type=float, default=None,
                   help="fixed variance of the vae family's Gaussian decoder [0.01]")
    p.add_argument("--latent", type=_positive_int, default=None, help="latent size d [100]")
    p.add_argument("--size", type=_positive_int, default=128, help="input size [128]")
    p.add_argument("--arch", choices=("bergmann", "zimmerer"), default=None,
                   help="default: zimmerer for --size 64, bergmann otherwise")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: the data's")
    p.add_argument("--steps", type=int, default=None, help="[10000]")
    p.add_argument("--batch", type=_positive_int, default=None, help="[16]")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate [1e-4]")
    p.add_argument("--seed", type=int, default=None, help="[0]")
    p.add_argument("--kl-warmup", type=int, default=None,
                   help="steps over which the KL weight of vae/gvae ramps from 0 to 1 [2000; 0: none]")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, help="[250]")
    p.add_argument("--weights", choices=("float32", "float16"), default=None,
                   help="dtype of the weights in model.pt [float32]; float16 halves its size")
    p.add_argument("--regime", choices=("plain", "corrupt"), default=None,
                   help="plain: reconstruct the input; corrupt: reconstruct it from a partly corrupted copy [plain]")
    p.add_argument("--corruption", choices=("patches", "cevae"), default=None,
                   help="corrupt regime: patches (noise, foreign, shuffled, deformed regions) or cevae "
                        "(the context-encoding VAE: noise squares beside the plain loss) [patches]")
    p.add_argument("--no-calibrate", action="store_true", help="stop after training; skip model.pt")
    p.add_argument("--out", required=True, help="run directory (resumed if it holds a checkpoint)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="recompute a run's Lr statistics and thresholds (writes model.pt)")
    p.add_argument("run")
    p.add_argument("--data", default=None, help="default: the data the run trained on")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("eval", help="evaluate a trained model on a test set")
    p.add_argument("run", help="run directory or model.pt")
    p.add_argument("--data", default=None, help="default: the data the run trained on")
    p.add_argument("--method", choices=("reconstruction", "projection") + PREDICTOR_METHODS, default="projection",
                   help="reconstruction or projection (DSSIM maps), or a pixel-wise predictor, or their ensemble "
                        "(fitted on 10%% of the test images, scored on the rest)")
    p.add_argument("--max-iters", type=_positive_int, default=None, help="iteration cap (default 100)")
    p.add_argument("--alpha", type=float, default=None, help="step size (default 0.5)")
    p.add_argument("--lam", type=float, default=None, help="weight of ||x - x0||_1 (default 0.05)")
    p.add_argument("--step", choices=("plain", "adam"), default=None, help="default plain")
    p.add_argument("--weighting", choices=("hadamard", "none"), default=None, help="default hadamard")
    p.add_argument("--energy-tol", type=float, default=None,
                   help="stop a sample when its relative energy change falls under this (default 0: off)")
    p.add_argument("--stop-threshold", type=float, default=None,
                   help="stop a sample when Lr falls under this (default: the training-set minimum)")
    p.add_argument("--json", required=True, help="where to write the metrics")
    p.add_argument("--save-maps", default=None, help="folder for per-image maps (.npy) and masks (.png)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="every anomaly map of several models on their test sets: JSON and Markdown")
    p.add_argument("models", nargs="+", help="model.pt files or run directories")
    p.add_argument("--data", default=None, help="default: each model's training data")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("sweep", help="train one model per value of beta or the latent size, then report them")
    p.add_argument("--data", required=True)
    p.add_argument("--model", choices=("vae", "gvae", "l2ae", "dsae"), default="vae")
    p.add_argument("--parameter", choices=("beta", "latent"), required=True)
    p.add_argument("--values", type=_floats, required=True, help="e.g. 0.1,0.5,1,2,10")
    p.add_argument("--steps", type=_positive_int, default=12000)
    p.add_argument("--size", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("export", help="write a bundle: ONNX encoder, decoder, step graph and manifest")
    p.add_argument("run", help="run directory or model.pt")
    p.add_argument("--out", required=True, help="bundle folder")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--fp16", action="store_true", help="also write step_fp16.onnx and measure its error")
    p.add_argument("--ensemble", default=None,
                   help="the JSON of `eproj eval --method ensemble`: store its fitted ensemble in the bundle")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("build-engine", help="build TensorRT engines from a bundle (needs TensorRT 10 or 11 and an NVIDIA GPU)")
    p.add_argument("bundle")
    p.add_argument("--fp16", action="store_true", help="build step_fp16.engine from step_fp16.onnx (export --fp16)")
    p.add_argument("--min-batch", type=_positive_int, default=1)
    p.add_argument("--opt-batch", type=_positive_int, default=8)
    p.add_argument("--max-batch", type=_positive_int, default=32)
    p.add_argument("--workspace-mb", type=_positive_int, default=1024)
    p.add_argument("--tf32", action="store_true", help="let fp32 engines use TF32 (off: they match ONNX Runtime)")
    p.set_defaults(func=_cmd_build_engine)

    p = sub.add_parser("run", help="inspect frames from a camera, video, folder or glob with a bundle")
    _runtime_options(p)
    _projection_options(p)
    p.add_argument("--source", required=True, help="camera:N, a video file, an image folder or a glob")
    p.add_argument("--out", required=True, help="folder for masks/, overlays/ and results.jsonl")
    p.add_argument("--show", action="store_true", help="show each overlay in a window (q quits)")
    p.add_argument("--max-frames", type=_positive_int, default=None, help="stop after this many frames")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="latency of the runtime against the eager-autograd reference")
    _runtime_options(p)
    p.add_argument("--batch", type=_batches, default=(1, 8, 32), help="batch sizes [1,8,32]")
    p.add_argument("--iters", type=int, default=30, help="iterations per frame, all run [30]")
    p.add_argument("--size", type=_positive_int, default=None, help="frame side [the model's]")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=_positive_int, default=20)
    p.add_argument("--no-reference", action="store_true", help="skip the eager-autograd row")
    p.add_argument("--json", required=True)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="reconstruction vs projection on the embedded textures")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--train", action="store_true", help="retrain the models from scratch first")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps with --train")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.raw = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except EprojError as exc:
        print(f"eproj: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eproj: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
