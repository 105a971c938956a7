"""The predictors' ingredients on the runtime: f(x0), dLr/dx and dKL/dx from the
bundle's step graph (ONNX Runtime, no autograd), the projection from an
Inspector. The maps themselves are ``eproj.predictors.predictor_maps``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eproj.errors import ConfigError
from eproj.predictors import Ingredients, loss_weights
from eproj.runtime.bundle import Bundle
from eproj.runtime.inspector import Inspector


class StepIngredients:
    """Ingredients of (N, C, S, S) batches for one bundle."""

    def __init__(self, bundle: str | Path, threads: int = 0, **projection: object):
        """``projection``: overrides of the bundle's projection parameters, for Proj-Rec-Error."""
        import onnxruntime as ort

        self.bundle = Bundle.load(bundle)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self._threads = threads
        self.session = ort.InferenceSession(self.bundle.graph_bytes("step"), options,
                                            providers=["CPUExecutionProvider"])
        model = self.bundle.manifest.get("model", {})
        self.weights = loss_weights(self.bundle.family, float(model.get("beta", 1.0)),
                                    float(model.get("decoder_variance", 0.01)))
        self._projector: Inspector | None = None
        self._projection = projection

    def close(self) -> None:
        """Release the session and the projection's Inspector. Idempotent."""
        if self._projector is not None:
            self._projector.close()
            self._projector = None
        self.session = None

    def __call__(self, x0: np.ndarray, with_projection: bool = False) -> Ingredients:
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, {"x": np.ascontiguousarray(x0, dtype=np.float32)})))
        projection = projection_map = None
        if with_projection:
            if self._projector is None:
                self._projector = Inspector.from_bundle(self.bundle.folder, backend="onnxruntime", fit="none",
                                                        channel_order="rgb", threads=self._threads,
                                                        **self._projection)
            results = self._projector([image.transpose(1, 2, 0) for image in x0])
            projection = np.stack([r.projection.transpose(2, 0, 1) for r in results])
            projection_map = np.stack([r.anomaly_map for r in results])
        if "kl_grad" not in out and self.bundle.family in ("vae", "gvae"):
            raise ConfigError(f"{self.bundle.folder}: the step graph lacks kl_grad; export it again")
        return Ingredients(x0=x0, reconstruction=out["reconstruction"], rec_grad=out["grad"],
                           kl_grad=out.get("kl_grad"), projection=projection,
                           rec_weight=self.weights[0], kl_weight=self.weights[1], projection_map=projection_map)
