"""TensorRT engines as a bundle records them: shared by the builder (``eproj.export.tensorrt``)
and the runtime's TensorRT backend, with the standard library only.

An engine is tied to the graph it was built from, to the TensorRT version that built
it and to the GPU. ``eproj build-engine`` records each engine in the bundle manifest's
``engines`` section (``eproj.bundle.record_engine``)::

    "engines": {"step": {"file": "step.engine", "sha256": ..., "bytes": ...,
                         "graph": "step.onnx", "graph_sha256": ..., "precision": "fp32", "tf32": false,
                         "batch": {"min": 1, "opt": 8, "max": 32}, "input": "x", "workspace_mb": 1024,
                         "tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}}

``verify_engine`` checks such a record before an engine is deserialized and refuses,
naming what differs and how to rebuild, an engine whose bytes, graph, TensorRT
version or GPU do not match. The TensorRT version must match exactly, not only its
major version: eproj does not build version-compatible engines
(``BuilderFlag.VERSION_COMPATIBLE``, which restricts the engine to the lean runtime), and
TensorRT documents that other engines load only with the version that built them.

``tensorrt`` and ``cuda-python`` are imported when first used.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eproj.bundle import ENGINE_SUFFIX, ENGINES, bundle_file
from eproj.errors import EprojError

# the graphs an engine is built from, each with its batched input. The fp32 build makes
# step, encoder and decoder engines; the fp16 build makes step_fp16 alone, from the
# mixed-precision graph of `eproj export --fp16` (there is no fp16 encoder or decoder graph).
ENGINE_INPUTS = {"step": "x", "step_fp16": "x", "encoder": "x", "decoder": "z"}
FP32_GRAPHS = ("step", "encoder", "decoder")
FP16_GRAPHS = ("step_fp16",)


class EngineError(EprojError):
    """TensorRT is missing, a graph does not parse or build, or an engine does not fit this bundle or machine."""


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is tied to besides its graph: rebuild when any of it differs."""

    tensorrt: str
    gpu: str
    compute_capability: str


def engine_file(graph: str) -> str:
    """The engine's file name in the bundle: ``step`` -> ``step.engine``."""
    return graph + ENGINE_SUFFIX


def rebuild_hint(folder: Path, graph: str) -> str:
    """The command that rebuilds ``graph``'s engine in bundle ``folder``."""
    return f"`eproj build-engine {folder}{' --fp16' if graph in FP16_GRAPHS else ''}`"


def require_tensorrt() -> str:
    """TensorRT's version; EngineError if it is missing (a stub-only package does not count)."""
    try:
        import tensorrt
    except ImportError:
        found = None
    else:
        found = tensorrt if hasattr(tensorrt, "Builder") else None
    if found is None:
        raise EngineError("TensorRT is not installed: `pip install tensorrt` (TensorRT 10 or 11, on a machine "
                          "with an NVIDIA GPU), or use the onnxruntime or torch backends")
    return str(found.__version__)


def current_target(trt_version: str) -> EngineTarget:
    """The TensorRT version given and the name and compute capability of CUDA device 0."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise EngineError("cuda-python is not installed: `pip install cuda-python`") from exc
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"no usable CUDA device: cudaGetDeviceProperties returned {err}")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return EngineTarget(trt_version, name.split("\x00", 1)[0], f"{props.major}.{props.minor}")


def check_target(record: dict[str, Any], current: EngineTarget, what: str, hint: str) -> None:
    """Raise EngineError naming every way ``record`` was built for another TensorRT or GPU than ``current``.

    ``what`` names the engine in the message, ``hint`` is the command that rebuilds it.
    """
    differences = []
    built, here = str(record.get("tensorrt")), current.tensorrt
    if built != here:
        kind = "major version" if built.split(".")[0] != here.split(".")[0] else "version"
        differences.append(f"TensorRT {built!r}, here {here!r} (another {kind}; an engine loads only "
                           f"with the TensorRT that built it)")
    for key in ("gpu", "compute_capability"):
        if record.get(key) != getattr(current, key):
            differences.append(f"{key} {record.get(key)!r}, here {getattr(current, key)!r}")
    if differences:
        raise EngineError(f"{what} was built for another setup: {'; '.join(differences)}. Rebuild it with {hint}")


def verify_engine(folder: Path, manifest: dict[str, Any], graph: str, current: EngineTarget) -> dict[str, Any]:
    """The manifest's record of ``graph``'s engine, after checking it against the bundle and this machine.

    ``manifest`` is the bundle's, verified by ``eproj.bundle.load_manifest`` (so the graphs'
    hashes under ``files`` are those of the files on disk). Raises EngineError, with the
    rebuild command, when the engine is missing or unrecorded, its bytes differ from the
    record, it was built from another graph than the bundle's, or for another TensorRT or GPU.
    """
    return verified_engine(folder, manifest, graph, current)[0]


def verified_engine(folder: Path, manifest: dict[str, Any], graph: str,
                    current: EngineTarget) -> tuple[dict[str, Any], bytes]:
    """``verify_engine``'s record and the engine's bytes, read once: the SHA-256 checked is that
    of the bytes returned, which are what ``deserialize_cuda_engine`` gets (an engine file
    replaced after the check is never deserialized)."""
    hint = rebuild_hint(folder, graph)
    record = manifest.get(ENGINES, {}).get(graph)
    if record is None:
        raise EngineError(f"{folder} has no {graph} engine recorded in its manifest; build it with {hint}")
    path = bundle_file(folder, record["file"], f"{ENGINES}.{graph}.file")
    data = _read_engine(path, hint)
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise EngineError(f"{path} has SHA-256 {digest[:16]}…; the manifest records {record['sha256'][:16]}… "
                          f"(replaced after it was built). Rebuild it with {hint}")
    graph_entry = manifest["graphs"].get(graph)
    if graph_entry is None:
        raise EngineError(f"{path} was built from {record['graph']}, which the bundle no longer has; export the "
                          f"bundle again with the graph, then rebuild the engine with {hint}")
    graph_digest = manifest["files"].get(graph_entry["file"], {}).get("sha256")
    if graph_digest != record["graph_sha256"]:
        raise EngineError(f"{path} was built from a {record['graph']} with SHA-256 {record['graph_sha256'][:16]}…; "
                          f"the bundle's is {str(graph_digest)[:16]}… (exported again since). Rebuild it with {hint}")
    check_target(record, current, str(path), hint)
    return dict(record), data


def _read_engine(path: Path, hint: str) -> bytes:
    """The whole engine file, opened without blocking; a regular file only (EngineError otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise EngineError(f"{path} is missing; build it with {hint}") from None
    except OSError as exc:
        raise EngineError(f"{path} cannot be read ({exc.strerror or exc}); rebuild it with {hint}") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise EngineError(f"{path} is missing (or not a regular file); build it with {hint}")
        try:
            return f.read()
        except OSError as exc:
            raise EngineError(f"{path} cannot be read ({exc.strerror or exc}); rebuild it with {hint}") from exc
