"""Export a trained model to a bundle of ONNX graphs.

``export_bundle`` writes, into one folder:

- ``encoder.onnx``: x (N, C, S, S) -> mu (N, d) (and logvar (N, d) for vae/gvae);
- ``decoder.onnx``: z (N, d) -> reconstruction (N, C, S, S); the U-Net (unet) has no
  latent code and no encoder or decoder graph: its reconstruction is the step's;
- ``step.onnx``: x -> reconstruction, loss (N,), grad (N, C, S, S) (and kl, kl_grad
  for vae/gvae): one projection step without autograd (``eproj.export.step``);
- ``forward.onnx``: x -> reconstruction, loss, the step's first two outputs from the
  same code without the gradient half (``StepModule(model, gradient=False)``), for
  passes that take no step: the zero-iteration gate's and the reconstruction baseline;
- with ``fp16=True``, ``step_fp16.onnx``: the same step with the network and its
  backward pass in float16 (the loss terms, input and outputs in float32), with its error against ``step.onnx`` measured by ONNX
  Runtime and written into the manifest;
- ``step.pt2`` and ``forward.pt2``: the step and forward graphs as ``torch.export``
  programs (weights included), which the runtime's torch backend runs with torch alone,
  without eproj's training code;
- ``model.pt``: the checkpoint, for the eager-autograd reference of ``eproj bench``;
- ``manifest.json`` (``eproj.bundle``).

N is dynamic in every graph. Each graph passes ``onnx.checker`` with full shape
inference and uses only ``ALLOWED_OPS``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from eproj import __version__
from eproj.bundle import write_manifest
from eproj.errors import ConfigError
from eproj.export.operators import ALLOWED_OPS
from eproj.export.step import StepModule
from eproj.train.checkpoint import TrainedModel, check_calibration, load_model, save_model
from eproj.train.data import fit_of
from eproj.train.models import Autoencoder

DEFAULT_OPSET = 17
FORWARD_OUTPUTS = ("reconstruction", "loss")  # the forward graph's: the step's first two
LR_DEFINITIONS = {
    "l2ae": "sum over pixels of (x - f(x))^2",
    "vae": "sum over pixels of (x - f(x))^2, f at the encoder mean",
    "dsae": "sum over pixels of the channel-mean DSSIM(x, f(x)), 11x11 Gaussian window, sigma 1.5, "
            "K1 0.01, K2 0.03, symmetric borders",
    "gvae": "sum over pixels of (x - f(x))^2 / (2 gamma^2) + D log gamma, f at the encoder mean",
    "unet": "sum over pixels of (x - U(x))^2, U the U-Net",
}


class _Encoder(nn.Module):
    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        mu, logvar = self.model.encode(x)
        if logvar is None:
            return mu.squeeze(3).squeeze(2)
        return mu.squeeze(3).squeeze(2), logvar.squeeze(3).squeeze(2)


def _half_step(model: Autoencoder) -> StepModule:
    """The step with the network and its backward pass in float16; the loss terms and
    the input/outputs stay float32 (see StepModule)."""
    return StepModule(copy.deepcopy(model).half(), loss_dtype=torch.float32)


class _Decoder(nn.Module):
    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z[:, :, None, None])


def graph_io(path: Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Input and output shapes of an ONNX file; dynamic dims are their names."""
    graph = onnx.load(str(path)).graph

    def dims(value) -> list[Any]:
        return [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]

    return {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}


def graph_ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _pin_static_dims(path: Path, module: nn.Module, example: torch.Tensor) -> None:
    """Declare every output dim but the batch as the static size it has (the exporter leaves some symbolic)."""
    with torch.no_grad():
        outputs = module(example)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    model = onnx.load(str(path))
    for value, tensor in zip(model.graph.output, outputs):
        for dim, size in list(zip(value.type.tensor_type.shape.dim, tensor.shape))[1:]:
            dim.dim_value = int(size)
    onnx.save(model, str(path))


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_names: list[str], opset: int) -> dict[str, Any]:
    axes = {name: {0: "N"} for name in [input_name, *output_names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=output_names,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    _pin_static_dims(path, module, example)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    outside = graph_ops(path) - ALLOWED_OPS
    if outside:
        raise RuntimeError(f"{path.name} uses operators outside ALLOWED_OPS: {sorted(outside)}")
    inputs, outputs = graph_io(path)
    return {"file": path.name, "inputs": inputs, "outputs": outputs}


class ExportError(ConfigError):
    """A graph cannot be exported faithfully (e.g. its float16 version overflows)."""


def check_finite_weights(model: nn.Module, path: Path) -> None:
    """ExportError naming the weights of ``model`` (loaded from ``path``) that hold NaN or Inf: their
    graphs would answer NaN for every frame, which no threshold flags."""
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
           for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ExportError(f"{path}: refusing to export a model with non-finite weights: {', '.join(bad[:4])}"
                          f"{' and more' if len(bad) > 4 else ''} (a diverged or damaged run)")


def _test_images(channels: int, size: int, batch: int = 8) -> np.ndarray:
    """(batch, C, S, S) float32 seeded images: half uniform noise, half smooth random fields."""
    import cv2

    rng = np.random.default_rng(0)
    x = rng.random((batch, channels, size, size)).astype(np.float32)
    for i in range(batch // 2, batch):
        for c in range(channels):
            x[i, c] = np.clip(0.5 + 2 * cv2.GaussianBlur(x[i, c] - 0.5, (0, 0), 3), 0, 1)
    return x


def _overflow(fp16_name: str, names: list[str], got: list[np.ndarray], want: list[np.ndarray], where: str) -> None:
    """ExportError naming the outputs that are inf/NaN in ``got`` where ``want`` is finite."""
    overflowing = [f"{n} ({int((~np.isfinite(g)).sum())} values)" for n, g, w in zip(names, got, want)
                   if np.isfinite(w).all() and not np.isfinite(g).all()]
    if overflowing:
        raise ExportError(f"{fp16_name} gives inf/NaN where the float32 step is finite ({where}): "
                          f"{', '.join(overflowing)}. The model's values exceed float16's range (max 65504); "
                          f"export it without --fp16")


def check_fp16_step(model: Autoencoder, fp16_name: str = "step_fp16.onnx", batch: int = 8) -> None:
    """Run the float16 step module in torch on the seeded test images; ExportError where it
    overflows and the float32 step does not. (ONNX Runtime's CPU provider computes some
    float16 operators in float32, so it alone can miss an overflow a GPU would hit.)"""
    cfg = model.config
    x = torch.from_numpy(_test_images(cfg.channels, cfg.size, batch))
    with torch.no_grad():
        want = [t.numpy() for t in StepModule(model)(x)]
        got = [t.float().numpy() for t in _half_step(model)(x)]
    names = ["reconstruction", "loss", "grad"] + (["kl", "kl_grad"] if cfg.variational else [])
    _overflow(fp16_name, names, got, want, f"torch float16, {batch} seeded test images")


def fp16_error(fp32_path: Path, fp16_path: Path, channels: int, size: int, batch: int = 8) -> dict[str, Any]:
    """Relative L2 error ||fp16 - fp32|| / ||fp32|| of every step output, by ONNX Runtime on the CPU.

    Inputs: ``batch`` seeded images, half uniform noise, half smooth random fields (image-like).
    Raises ExportError, naming the outputs, where the float16 graph gives inf or NaN
    on an input on which the float32 graph is finite (a float16 overflow).
    """
    import onnxruntime as ort

    x = _test_images(channels, size, batch)
    providers = ["CPUExecutionProvider"]
    reference = ort.InferenceSession(str(fp32_path), providers=providers)
    half = ort.InferenceSession(str(fp16_path), providers=providers)
    names = [o.name for o in reference.get_outputs()]
    want = reference.run(None, {"x": x})
    got = half.run(None, {"x": x})
    _overflow(fp16_path.name, names, got, want, f"ONNX Runtime, {batch} seeded test images")
    errors = {n: float(np.linalg.norm(g - w) / max(float(np.linalg.norm(w)), 1e-12))
              for n, g, w in zip(names, got, want)}
    return {"relative_l2": errors, "measured_with": f"onnxruntime {ort.__version__} CPUExecutionProvider",
            "inputs": f"{batch} seeded images: uniform noise and smooth random fields"}


def export_bundle(trained: TrainedModel | str | Path, out: str | Path, opset: int = DEFAULT_OPSET,
                  fp16: bool = False, ensemble: dict[str, Any] | None = None) -> Path:
    """Write the ONNX graphs and manifest of a trained model into folder ``out``; returns the manifest path.

    ``ensemble``: a fitted predictor ensemble (``eproj.train.ensemble.fit_ensemble``) for the
    runtime's ``method="ensemble"``; written as ``ensemble.json`` and hashed with the graphs.
    """
    if not isinstance(trained, TrainedModel):
        trained = load_model(trained)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from eproj.bundle import remove_engines  # engines built from the graphs replaced here are stale
    remove_engines(out)
    model = trained.model.float().eval()
    check_finite_weights(model, trained.path)
    check_calibration(trained.calibration, trained.path)
    cfg = model.config
    x = torch.rand(2, cfg.channels, cfg.size, cfg.size)
    variational = cfg.variational
    graphs = {}
    if isinstance(model, Autoencoder):  # the U-Net has no latent code: its step graph gives its reconstruction
        graphs["encoder"] = _export(_Encoder(model), x, out / "encoder.onnx", "x",
                                    ["mu", "logvar"] if variational else ["mu"], opset)
        graphs["decoder"] = _export(_Decoder(model), torch.rand(2, cfg.latent), out / "decoder.onnx", "z",
                                    ["reconstruction"], opset)
    graphs["step"] = _export(StepModule(model), x, out / "step.onnx", "x",
                             ["reconstruction", "loss", "grad"] + (["kl", "kl_grad"] if variational else []), opset)
    graphs["forward"] = _export(StepModule(model, gradient=False), x, out / "forward.onnx", "x",
                                list(FORWARD_OUTPUTS), opset)
    if fp16:
        graphs["step_fp16"] = _export(_half_step(model), x, out / "step_fp16.onnx", "x",
                                      list(graphs["step"]["outputs"]), opset)
        try:
            check_fp16_step(model)
            graphs["step_fp16"]["error_vs_fp32"] = fp16_error(out / "step.onnx", out / "step_fp16.onnx",
                                                              cfg.channels, cfg.size)
        except ExportError:
            (out / "step_fp16.onnx").unlink()  # never left beside a bundle that does not list it
            raise
    cal = trained.calibration
    manifest = {
        "eproj_version": __version__,
        "family": cfg.family,
        "model": cfg.to_dict(),
        "input": {"size": cfg.size, "channels": cfg.channels, "layout": "NCHW", "dtype": "float32",
                  "value_range": [0.0, 1.0], "channel_order": "RGB" if cfg.channels == 3 else "gray",
                  "normalisation": "8-bit pixels divided by 255, 16-bit by 65535; no mean or std",
                  **_input_geometry(trained.train)},
        "lr_definition": LR_DEFINITIONS[cfg.family],
        "stop_threshold": float(cal["stop_threshold"]),
        # the stop rule in force and every rule calibrated (eproj.train.calibrate); a model
        # calibrated before stop rules has its training-minimum threshold only
        "stop_rule": cal.get("stop_rule", "training-min"),
        "stop_rules": cal.get("stop_rules", {"training-min": {"stop_threshold": float(cal["stop_threshold"]),
                                                              "max_iters": None, "gate_lr": None}}),
        "lr_stats": cal["lr_stats"],
        "segmentation": cal["segmentation"],
        **({"decision": cal["decision"]} if "decision" in cal else {}),  # the verdict (eproj.decision)
        # unet: the permutation scores' orders, normalisers and thresholds (eproj.runtime.permutation)
        **({"permutation": cal["permutation"]} if "permutation" in cal else {}),
        "projection": cal["projection"],
        "opset": opset,
        "graphs": graphs,
        "weights": _copy_weights(trained, out),
        "torch_step": _export_torch_step(model, x, out / "step.pt2"),
        "torch_forward": _export_torch_step(model, x, out / "forward.pt2", gradient=False),
    }
    if ensemble is not None:
        if not cfg.variational:
            raise ConfigError(f"the predictor ensemble needs a variational family (vae, gvae); "
                              f"{trained.path} is {cfg.family}")
        import json

        from eproj.files import write_atomic

        write_atomic(out / "ensemble.json", json.dumps(ensemble, indent=2).encode())
        manifest["ensemble"] = {"file": "ensemble.json", "threshold": 0.5,
                                "note": "logistic regression over the pixel-wise predictors; map = probability"}
    return write_manifest(out, manifest)


def _input_geometry(train: dict[str, Any]) -> dict[str, Any]:
    """The manifest ``input``'s geometry from the checkpoint's training record: ``fit`` ("tile" or
    "resize") and, for "tile", ``scale``, the factor training resized its images by before cropping,
    which the runtime resizes frames by before tiling. Checkpoints from before eproj recorded it:
    the fit from the data spec and scale 1.0 (frames tiled at their own size, as then), said in
    ``scale_recorded``."""
    recorded = train.get("input")
    if recorded:
        return {"fit": recorded["fit"], "scale": recorded.get("scale"), "scale_recorded": True}
    fit = fit_of(train["data"]) if train.get("data") else "resize"
    return {"fit": fit, "scale": 1.0 if fit == "tile" else None, "scale_recorded": False}


def _export_torch_step(model: Autoencoder, example: torch.Tensor, path: Path,
                       gradient: bool = True) -> dict[str, Any]:
    """``StepModule(model, gradient=gradient)`` (the step, or without ``gradient`` the forward
    graph) as a ``torch.export`` program with a dynamic batch, saved to ``path``: what the
    runtime's torch backend loads (torch alone, no eproj.train)."""
    step = StepModule(model, gradient=gradient).eval()
    for p in step.parameters():
        p.requires_grad_(False)
    batch = torch.export.Dim("N", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(step, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    graph = "step" if gradient else "forward"
    return {"file": path.name, "format": f"torch.export ExportedProgram (x -> the {graph} graph's outputs)",
            "torch": torch.__version__}


def _copy_weights(trained: TrainedModel, out: Path) -> dict[str, Any]:
    """The checkpoint itself, for the eager-autograd reference that ``eproj bench``
    compares the runtime with; hashed with the graphs."""
    target = save_model(trained, out / "model.pt")
    return {"file": target.name, "format": "eproj model (torch.load weights_only)"}
