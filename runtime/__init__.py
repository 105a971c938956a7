"""The deployable projection loop: NumPy, the compiled kernels (eproj.cpp_ext)
and one inference backend; no torch, no autograd.

- ``Inspector`` (``inspector.py``): the Python API for vision stacks;
- ``backends/``: ONNX Runtime, torch and TensorRT, one module each;
- ``projector.py``: the loop (step graph -> stop check -> fused update, then DSSIM);
- ``frames.py``: frames in, maps back at the frames' geometry;
- ``cli.py``: ``eproj run`` and ``eproj bench``.
"""

from __future__ import annotations

from eproj.runtime.inspector import InspectionResult, Inspector

__all__ = ["Inspector", "InspectionResult"]
