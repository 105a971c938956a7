"""TensorRT engines built from a bundle's ONNX graphs, with one code path for TensorRT 10 and 11.

TensorRT 11 removed weakly typed networks (``BuilderFlag.FP16``, ``INT8``, precision
constraints); TensorRT 10.3 (JetPack 6) has both. Every engine here is built from a
strongly typed network, so the graph's own types decide each layer's precision:

- ``build_engines(bundle)`` builds ``step``, ``encoder`` and ``decoder`` engines from the
  fp32 graphs, with TF32 off (``BuilderFlag.TF32`` cleared) so they compute what ONNX
  Runtime computes; ``tf32=True`` allows TF32 tensor cores instead;
- ``build_engines(bundle, fp16=True)`` builds ``step_fp16.engine``, the engine the runtime's
  ``precision="fp16"`` loads, from the mixed-precision ``step_fp16.onnx`` of
  ``eproj export --fp16`` (its loss terms stay fp32, as exported).

Each graph is parsed with all parser errors reported (the parser lives until the
engine is built), built with one optimization profile over the batch range and a
workspace limit, with a timing cache kept in the bundle, and recorded in the
bundle's manifest (``eproj.bundle.record_engine``): its hash, its graph's hash, the
TensorRT version, the GPU, the batch range and the precision. The graph is parsed from
the bytes whose SHA-256 was checked (``eproj.bundle.read_verified``), so the recorded graph
hash is that of what was built. The runtime refuses an engine whose record does not match
(``eproj.engines.verify_engine``).

``tensorrt`` and ``cuda-python`` are imported when first used; without them the
command says what to install.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eproj.bundle import load_manifest, read_verified, record_engine
from eproj.engines import (ENGINE_INPUTS, FP16_GRAPHS, FP32_GRAPHS, EngineError, current_target, engine_file,
                           require_tensorrt)
from eproj.files import write_atomic

if TYPE_CHECKING:
    import tensorrt

TIMING_CACHE = "timing.cache"


def check_batch_range(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """EngineError unless 1 <= min_batch <= opt_batch <= max_batch."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineError(f"batch range must satisfy 1 <= min <= opt <= max, got "
                          f"{min_batch}, {opt_batch}, {max_batch}")


def strongly_typed_flags() -> int:
    """``create_network``'s flags: strongly typed (TensorRT 11 ignores the flag: it is always so)."""
    import tensorrt as trt

    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _parse(logger: "tensorrt.ILogger", builder: "tensorrt.Builder", graph: bytes,
           onnx_path: Path) -> "tuple[tensorrt.INetworkDefinition, tensorrt.OnnxParser]":
    """The strongly typed network of the ONNX ``graph`` (the verified bytes of ``onnx_path``,
    which names it in messages) and its parser, which must outlive the build:
    TensorRT reads the weights the parser owns (freeing it first crashes or builds garbage)."""
    import tensorrt as trt

    network = builder.create_network(strongly_typed_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph, str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse {onnx_path}:\n  " + "\n  ".join(errors))
    return network, parser


def _config(builder: "tensorrt.Builder", input_name: str, per_sample: tuple[int, ...], batch: dict[str, int],
            workspace_mb: int, tf32: bool, timing_cache: bytes) -> "tensorrt.IBuilderConfig":
    """The builder config: workspace limit, TF32 as asked, the timing cache, one batch profile."""
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, trt.Dims([batch["min"], *per_sample]), trt.Dims([batch["opt"], *per_sample]),
                      trt.Dims([batch["max"], *per_sample]))
    config.add_optimization_profile(profile)
    return config


def build_engines(bundle: str | Path, fp16: bool = False, min_batch: int = 1, opt_batch: int = 8,
                  max_batch: int = 32, workspace_mb: int = 1024, tf32: bool = False) -> list[Path]:
    """Build, save and record the bundle's engines; returns their paths.

    fp32 (default): ``step.engine``, ``encoder.engine``, ``decoder.engine``, TF32 off
    unless ``tf32``. ``fp16``: ``step_fp16.engine`` from ``step_fp16.onnx``; an
    EngineError if the bundle was exported without ``--fp16``. Batches of
    ``min_batch``..``max_batch`` images, tuned for ``opt_batch``.
    """
    check_batch_range(min_batch, opt_batch, max_batch)
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    # the bundle's graphs of the precision (load_manifest checks that every family's required ones are
    # there; a unet bundle has no encoder or decoder graph)
    graphs = [g for g in (FP16_GRAPHS if fp16 else FP32_GRAPHS) if g in manifest["graphs"]]
    if fp16 and "step_fp16" not in manifest["graphs"]:
        raise EngineError(f"{bundle} has no step_fp16 graph, which the fp16 engine is built from (the fp16 "
                          f"engine keeps the graph's mixed precision); export the bundle with "
                          f"`eproj export RUN --out {bundle} --fp16`")
    target = current_target(require_tensorrt())
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = bundle / TIMING_CACHE
    batch = {"min": min_batch, "opt": opt_batch, "max": max_batch}
    written = []
    for graph in graphs:
        entry, input_name = manifest["graphs"][graph], ENGINE_INPUTS[graph]
        listed = manifest["files"][entry["file"]]
        graph_bytes = read_verified(bundle, entry["file"], listed["bytes"], listed["sha256"], f"graphs.{graph}.file")
        network, parser = _parse(logger, builder, graph_bytes, bundle / entry["file"])
        per_sample = tuple(int(d) for d in entry["inputs"][input_name][1:])
        config = _config(builder, input_name, per_sample, batch, workspace_mb, tf32,
                         cache_path.read_bytes() if cache_path.is_file() else b"")
        serialized = builder.build_serialized_network(network, config)
        del parser  # the network's weights belong to the parser: only now may it go
        if serialized is None:
            raise EngineError(f"TensorRT could not build an engine from {entry['file']} (see its log above)")
        engine_path = bundle / engine_file(graph)
        write_atomic(engine_path, bytes(serialized))
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
        record: dict[str, Any] = {"graph": entry["file"], "graph_sha256": listed["sha256"],
                                  "precision": "fp16" if fp16 else "fp32", "tf32": tf32, "input": input_name,
                                  "batch": batch, "workspace_mb": workspace_mb, **asdict(target)}
        record_engine(bundle, graph, engine_path, record)
        written.append(engine_path)
    return written
