"""TensorRT engines built from a bundle's ONNX graphs (TensorRT 10 Python API).

``build_engines`` parses ``step.onnx``, ``encoder.onnx`` and ``decoder.onnx``
(reporting every parser error), builds each with one optimization profile over
the batch range and a workspace limit, keeps a timing cache in the bundle, and
saves ``<graph>.engine`` with ``<graph>.engine.json`` beside it: the TensorRT
version and the GPU's name and compute capability. ``load_engine`` refuses an
engine built for another TensorRT version or GPU, saying to rebuild.

``tensorrt`` and ``cuda-python`` are imported when first used; without them the
command says what to install.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eproj.bundle import load_manifest
from eproj.errors import EprojError
from eproj.files import write_atomic

if TYPE_CHECKING:
    import tensorrt

ENGINE_GRAPHS = {"step": "x", "encoder": "x", "decoder": "z"}  # graph -> its batched input
TIMING_CACHE = "timing.cache"


class EngineError(EprojError):
    """TensorRT is missing, a graph does not parse or build, or an engine does not fit this machine."""


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is tied to: rebuild when any of it differs."""

    tensorrt: str
    gpu: str
    compute_capability: str


def require_tensorrt() -> str:
    """TensorRT's version; EngineError if it is missing (a stub-only package does not count)."""
    try:
        import tensorrt
    except ImportError:
        found = None
    else:
        found = tensorrt if hasattr(tensorrt, "Builder") else None
    if found is None:
        raise EngineError("TensorRT is not installed: `pip install tensorrt` (TensorRT 10, on a machine "
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
    return EngineTarget(trt_version, name.rstrip("\x00"), f"{props.major}.{props.minor}")


def check_target(engine: Path, recorded: dict[str, Any], current: EngineTarget) -> None:
    """Raise EngineError naming what differs between an engine's record and this machine."""
    wanted = asdict(current)
    differences = [f"{key} {recorded.get(key)!r} (here {value!r})" for key, value in wanted.items()
                   if recorded.get(key) != value]
    if differences:
        raise EngineError(f"{engine} was built for another setup: {', '.join(differences)}. "
                          f"Rebuild it with `eproj build-engine {engine.parent}`")


def _parse(logger: "tensorrt.ILogger", builder: "tensorrt.Builder",
           onnx_path: Path) -> "tensorrt.INetworkDefinition":
    import tensorrt as trt

    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse {onnx_path}:\n  " + "\n  ".join(errors))
    return network


def build_engines(bundle: str | Path, fp16: bool = False, min_batch: int = 1, opt_batch: int = 8,
                  max_batch: int = 32, workspace_mb: int = 1024) -> list[Path]:
    """Build and save one engine per graph in ``ENGINE_GRAPHS``; returns the engine paths."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineError(f"batch range must satisfy 1 <= min <= opt <= max, got "
                          f"{min_batch}, {opt_batch}, {max_batch}")
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    target = current_target(require_tensorrt())
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = bundle / TIMING_CACHE
    written = []
    for graph, input_name in ENGINE_GRAPHS.items():
        entry = manifest["graphs"][graph]
        network = _parse(logger, builder, bundle / entry["file"])
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        per_sample = tuple(int(d) for d in entry["inputs"][input_name][1:])
        profile.set_shape(input_name, trt.Dims([min_batch, *per_sample]), trt.Dims([opt_batch, *per_sample]),
                          trt.Dims([max_batch, *per_sample]))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT could not build an engine from {entry['file']} (see its log above)")
        engine_path = bundle / f"{graph}.engine"
        write_atomic(engine_path, bytes(serialized))
        record = {**asdict(target), "graph": entry["file"], "fp16": fp16,
                  "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch}, "workspace_mb": workspace_mb}
        write_atomic(engine_path.with_name(engine_path.name + ".json"), json.dumps(record, indent=2).encode())
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
        written.append(engine_path)
    return written


def load_engine(path: str | Path) -> "tensorrt.ICudaEngine":
    """Deserialize an engine after checking it was built for this TensorRT version and GPU."""
    path = Path(path)
    record_path = path.with_name(path.name + ".json")
    if not path.is_file() or not record_path.is_file():
        raise EngineError(f"{path} or its record {record_path.name} is missing; run `eproj build-engine`")
    check_target(path, json.loads(record_path.read_text()), current_target(require_tensorrt()))
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not load {path}; rebuild it with `eproj build-engine {path.parent}`")
    return engine

