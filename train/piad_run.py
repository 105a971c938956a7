"""``eproj train --model piad``: a PIAD run from a data spec, end to end.

The data come from the same sources as the other families (``eproj.train.data.load_source``:
``textures:NAME``, ``mvtec:PATH/CATEGORY``, ``folder:PATH``, with their fit and working scale);
the frozen feature network is built from its pretrained weights
(``eproj.train.perceptual.build_feature_network``); ``eproj.train.piad.train_piad`` trains or
resumes the run; ``eproj.train.piad_calibrate.write_piad_model`` writes model.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

from eproj.errors import ConfigError, DataError
from eproj.train.data import TRAINING_FITS, load_source
from eproj.train.perceptual import FEATURE_NETWORKS, build_feature_network, feature_record
from eproj.train.piad import PIADTrainConfig, train_piad
from eproj.train.piad_networks import PIADConfig

WEIGHT_DTYPES = ("float32", "float16")


def run_piad(run_dir: str | Path, data: str, config: PIADConfig, train: PIADTrainConfig,
             perceptual: str = "efficientnet-lite0", perceptual_weights: str | Path | None = None,
             tap: str = "stage3", fit: str | None = None, weights: str = "float32",
             calibrate_after: bool = True, progress: bool = True) -> Path:
    """Train (or resume) the PIAD run in ``run_dir`` on ``data``, then calibrate it.

    ``perceptual``: one of ``FEATURE_NETWORKS``; ``perceptual_weights``: its weight file (VGG-19:
    required; EfficientNet-Lite0: default the installed package's); ``tap``: EfficientNet-Lite0's
    layer (VGG-19's is relu4_2). ``weights``: dtype of model.pt's weights. Returns model.pt's path
    (checkpoint.pt's when ``calibrate_after`` is False)."""
    if perceptual not in FEATURE_NETWORKS:
        raise ConfigError(f"--perceptual must be one of {FEATURE_NETWORKS}, got {perceptual!r}")
    if weights not in WEIGHT_DTYPES:
        raise ConfigError(f"--weights must be one of {WEIGHT_DTYPES}, got {weights!r}")
    if fit is not None and fit not in TRAINING_FITS:
        raise ConfigError(f"--fit must be one of {TRAINING_FITS}, got {fit!r}")
    source = load_source(data, size=config.size, seed=train.seed, fit=fit)
    if source.channels != config.channels:
        raise DataError(f"{data} has {source.channels}-channel images; the model was asked for "
                        f"{config.channels} channel(s)")
    weight_path = None if perceptual_weights is None else str(Path(perceptual_weights).resolve())
    features = feature_record(perceptual, weight_path, tap)
    network = build_feature_network(perceptual, weight_path, tap)
    record = {"data": data, "fit": fit, "input": source.input_record(), "weights": weights,
              "feature_weights": weight_path}
    if progress:
        scale = f"; working scale {source.scale:g}" if source.fit == "tile" else ""
        print(f"piad: {data}, fit {source.fit}{scale}; features {features['network']} {features['tap']} "
              f"({features['weights']}); {config.size}x{config.size}, width {config.width}, latent {config.latent}, "
              f"batch {train.batch}, n_dis {train.n_dis}", file=sys.stderr)
    ckpt = train_piad(run_dir, config, train, source, network, features, progress=progress, data=record)
    if not calibrate_after:
        return ckpt
    from eproj.train.piad_calibrate import write_piad_model

    return write_piad_model(run_dir, progress=progress)
