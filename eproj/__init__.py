"""eproj: unsupervised visual anomaly localization by iterative energy-based projection.

Stages, each its own subpackage:

- ``eproj.train``: PyTorch autoencoders, training, the reference projection and evaluation.
- ``eproj.export``: ONNX graphs and TensorRT engines built from trained models.
- ``eproj.runtime``: the projection-and-segmentation loop for deployment.
"""

from eproj.errors import CheckpointError, ConfigError, DataError, EprojError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "EprojError", "__version__"]
