"""Recording fakes of ``tensorrt`` and cuda-python's runtime, for the tests of the engine
builder and the TensorRT backend on machines without TensorRT or a GPU.

They follow the real API as the stubs of tests/tensorrt_stubs show it, and check what
TensorRT checks only by crashing or misbehaving:

- ``version="11..."`` has no ``BuilderFlag.FP16``/``INT8``/``OBEY_PRECISION_CONSTRAINTS``
  (TensorRT 11 removed them); ``"10..."`` has them, and records any use;
- ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` has another value than the real
  one (1), so flags written as a literal bit do not pass;
- ``OnnxParser`` has ``parse`` (the graph's bytes) alone: eproj parses the verified bytes,
  never the file by path;
- ``build_serialized_network`` fails if the network's ONNX parser has been freed
  (TensorRT reads weights the parser owns);
- the fake CUDA runtime counts live streams, allocations and graph executions.

Load with ``load_fakes()`` (the tests folders are not packages).
"""

from __future__ import annotations

import itertools
import types
import weakref
from pathlib import Path
from typing import Any


class _Enum:
    """An enum member: ``int()`` gives its value, like pybind11's enums."""

    def __init__(self, name: str, value: int):
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"<{self.name}: {self.value}>"


def _enum(name: str, members: dict[str, int]) -> type:
    return type(name, (), {key: _Enum(f"{name}.{key}", value) for key, value in members.items()})


class FakeTensorRT(types.ModuleType):
    """A ``tensorrt`` module of the given version whose objects record what is done to them."""

    def __init__(self, version: str):
        super().__init__("tensorrt")
        self.__version__ = version
        self.networks: list[Any] = []
        self.configs: list[Any] = []
        self.parsed: list[str] = []
        major = int(version.split(".")[0])
        flags = {"TF32": 7, "VERSION_COMPATIBLE": 9, "REFIT": 3}
        if major < 11:
            flags.update(FP16=0, INT8=1, OBEY_PRECISION_CONSTRAINTS=11)
        self.BuilderFlag = _enum("BuilderFlag", flags)
        self.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
        self.MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0})
        trt = self

        class Logger:
            WARNING = _Enum("Severity.WARNING", 2)

            def __init__(self, severity: Any = None):
                self.severity = severity

        class Dims(list):
            pass

        class Network:
            def __init__(self, flags: int):
                self.flags = flags
                self.parser: Any = None

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger):
                self.network = network
                self.num_errors = 0
                network.parser = weakref.ref(self)

            def parse(self, model: bytes, path: str | None = None) -> bool:
                if not isinstance(model, (bytes, bytearray, memoryview)) or not model:
                    raise TypeError(f"fake TensorRT: parse takes the ONNX model's bytes, got {type(model).__name__}")
                trt.parsed.append(Path(path).name if path else "<bytes>")
                return True

            def get_error(self, index: int) -> str:
                raise IndexError(index)

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

            def set_shape(self, name: str, low: Dims, opt: Dims, high: Dims) -> None:
                self.shapes[name] = (list(low), list(opt), list(high))

        class TimingCache:
            def serialize(self) -> bytes:
                return b"timing cache"

        class Config:
            def __init__(self) -> None:
                self.set: list[str] = []
                self.cleared: list[str] = []
                self.profiles: list[Profile] = []
                self.pool: dict[str, int] = {}

            def set_memory_pool_limit(self, pool: _Enum, size: int) -> None:
                self.pool[pool.name] = size

            def set_flag(self, flag: _Enum) -> None:
                self.set.append(flag.name)

            def clear_flag(self, flag: _Enum) -> None:
                self.cleared.append(flag.name)

            def create_timing_cache(self, data: bytes) -> TimingCache:
                return TimingCache()

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> TimingCache:
                return TimingCache()

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

        class Builder:
            def __init__(self, logger: Logger):
                self.logger = logger

            def create_network(self, flags: int = 0) -> Network:
                network = Network(flags)
                trt.networks.append(network)
                return network

            def create_builder_config(self) -> Config:
                config = Config()
                trt.configs.append(config)
                return config

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                if network.parser is None or network.parser() is None:
                    raise RuntimeError("fake TensorRT: the network's ONNX parser was freed before the build "
                                       "(its weights are gone)")
                return f"engine {trt.parsed[-1]} {config.set} {len(trt.configs)}".encode()

        class ExecutionContext:
            def __init__(self, engine: "Engine"):
                self.engine, self.shapes, self.addresses, self.launches = engine, {}, {}, 0

            def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name: str) -> Dims:
                return Dims([self.shapes["x"][0]] + ([] if name == "kl" else list(self.shapes["x"][1:])))

            def set_tensor_address(self, name: str, address: int) -> bool:
                self.addresses[name] = address
                return True

            def execute_async_v3(self, stream: int) -> bool:
                self.launches += 1
                return True

        class Engine:
            def __init__(self, data: bytes, tensors: list[str]):
                self.data, self.tensors, self.contexts = data, tensors, []

            @property
            def num_io_tensors(self) -> int:
                return len(self.tensors)

            def get_tensor_name(self, index: int) -> str:
                return self.tensors[index]

            def create_execution_context(self) -> ExecutionContext:
                context = ExecutionContext(self)
                self.contexts.append(context)
                return context

        class Runtime:
            tensors = ["x", "reconstruction", "loss", "grad"]

            def __init__(self, logger: Logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes) -> Engine:
                return Engine(bytes(data), list(self.tensors))

        for cls in (Logger, Dims, OnnxParser, Builder, Runtime):
            setattr(self, cls.__name__, cls)


class FakeCudaRuntime(types.ModuleType):
    """``cuda.bindings.runtime`` with a device that lives in a few counters."""

    cudaStreamNonBlocking = 1

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.streams: set[int] = set()
        self.allocations: set[int] = set()
        self.graphs: set[str] = set()
        self.executables: set[str] = set()
        self.calls: list[str] = []
        self._ids = itertools.count(0x1000)

    def _ok(self, what: str, *values: Any) -> tuple[Any, ...]:
        self.calls.append(what)
        return (0, *values)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[Any, ...]:
        stream = next(self._ids)
        self.streams.add(stream)
        return self._ok("cudaStreamCreateWithFlags", stream)

    def cudaStreamDestroy(self, stream: int) -> tuple[Any, ...]:
        self.streams.remove(int(stream))
        return self._ok("cudaStreamDestroy")

    def cudaStreamSynchronize(self, stream: int) -> tuple[Any, ...]:
        return self._ok("cudaStreamSynchronize")

    def cudaMalloc(self, nbytes: int) -> tuple[Any, ...]:
        pointer = next(self._ids) << 8
        self.allocations.add(pointer)
        return self._ok("cudaMalloc", pointer)

    def cudaFree(self, pointer: int) -> tuple[Any, ...]:
        self.allocations.remove(pointer)
        return self._ok("cudaFree")

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[Any, ...]:
        return self._ok("cudaMemcpyAsync")

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[Any, ...]:
        return self._ok("cudaStreamBeginCapture")

    def cudaStreamEndCapture(self, stream: int) -> tuple[Any, ...]:
        graph = f"graph{next(self._ids)}"
        self.graphs.add(graph)
        return self._ok("cudaStreamEndCapture", graph)

    def cudaGraphInstantiate(self, graph: str, flags: int) -> tuple[Any, ...]:
        executable = f"exec-of-{graph}"
        self.executables.add(executable)
        return self._ok("cudaGraphInstantiate", executable)

    def cudaGraphDestroy(self, graph: str) -> tuple[Any, ...]:
        self.graphs.remove(graph)
        return self._ok("cudaGraphDestroy")

    def cudaGraphExecDestroy(self, executable: str) -> tuple[Any, ...]:
        self.executables.remove(executable)
        return self._ok("cudaGraphExecDestroy")

    def cudaGraphLaunch(self, executable: str, stream: int) -> tuple[Any, ...]:
        assert executable in self.executables, "launch of a destroyed graph execution"
        return self._ok("cudaGraphLaunch")

    def cudaGetErrorString(self, error: int) -> tuple[Any, ...]:
        return (0, b"fake error")


def install(monkeypatch: Any, version: str, cuda: bool = False) -> tuple[FakeTensorRT, FakeCudaRuntime | None]:
    """Put a fake ``tensorrt`` (and, with ``cuda``, ``cuda.bindings.runtime``) in ``sys.modules``
    for the test using ``monkeypatch``; returns them."""
    import sys

    trt = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cudart = None
    if cuda:
        cudart = FakeCudaRuntime()
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = cudart  # type: ignore[attr-defined]
        package = types.ModuleType("cuda")
        package.bindings = bindings  # type: ignore[attr-defined]
        for name, module in (("cuda", package), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
            monkeypatch.setitem(sys.modules, name, module)
    return trt, cudart
