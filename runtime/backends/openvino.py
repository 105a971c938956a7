"""OpenVINO: the CPU plugin in f32 (``pip install openvino onnx``, or ``eproj[openvino]``).

The step graph is read from the bundle's verified ONNX bytes (``Bundle.graph_bytes``),
never from the file again, and every constant it reads in more than one place is
untied in memory first (``untie_constants``): OpenVINO 2026.4's CPU plugin returns a
wrong result when one weight tensor of shape (C, C, k, k), C > 1, feeds both a Conv
and a ConvTranspose, which is what the step graph's analytic backward pass does with
every square layer (measured on the brick model's step graph: the gradient's relative
error 0.99, the reconstruction and Lr right). ``tests/runtime/test_openvino.py``
keeps that finding as a regression check. With its own copy per node, the result
matches ONNX Runtime's (the parity tests).

The step graph runs on infer requests whose input and outputs wrap the loop's NumPy
buffers (shared memory), so nothing is copied per iteration. The forward graph
(``prepare_forward``) is compiled the same way (untied too) when first asked for; for a
bundle exported before it, the step graph stands in for it. Threads as in the
onnxruntime backend: a batch of two or more tiles is split across ``loops`` loops
side by side (default ``threads``, or every core), each running its requests on a
stream of one thread of a compiled model with one stream per loop; a single tile
(or ``loops=1``) runs one loop on a compiled model of ``threads`` threads.

OpenVINO's CPU plugin runs a request called synchronously on the graph of stream 0
whatever thread calls it, and locks that graph: two loops calling ``infer()`` at once
would take turns. The loops side by side therefore start their requests
asynchronously and wait, so each runs on a stream (and graph) of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle

INSTALL = "pip install openvino onnx (or eproj[openvino])"


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ConfigError(f"the openvino backend needs OpenVINO: {INSTALL}") from None
    return openvino


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError(f"the openvino backend needs onnx to untie the step graph's shared weights: "
                          f"{INSTALL}") from None
    return onnx


def untie_constants(model: Any) -> int:
    """Give every node input that reads a constant already read by another node input (or
    by an earlier input of the same node) a copy of its own, in place; return the number of
    copies made.

    ``model``: an ``onnx.ModelProto``. A constant is an initializer (copied as a new
    initializer) or the output of a ``Constant`` node (copied as a new ``Constant`` node
    right after it). Graph outputs that are constants are left as they are. A graph with
    subgraphs (If, Loop, Scan) is a ConfigError: their nodes may read the outer constants,
    and this untying does not follow them.
    """
    import copy

    graph = model.graph
    for node in graph.node:
        if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise ConfigError(f"the openvino backend unties the step graph's shared weights in the main graph "
                              f"only; node {node.name or node.op_type!r} ({node.op_type}) holds a subgraph")
    initializers = {t.name: t for t in graph.initializer}
    constant_nodes = {node.output[0]: node for node in graph.node if node.op_type == "Constant" and node.output}
    taken: set[str] = set()
    copies: list[tuple[Any, Any]] = []  # (copied Constant node, the node it copies)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {v.name for v in graph.input}
    made = 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in initializers and name not in constant_nodes:
                continue
            if name not in taken:
                taken.add(name)
                continue
            made += 1
            new = f"{name}__untied_{made}"
            while new in names:
                new += "_"
            names.add(new)
            if name in initializers:
                tensor = copy.deepcopy(initializers[name])
                tensor.name = new
                graph.initializer.append(tensor)
            else:
                original = constant_nodes[name]
                twin = copy.deepcopy(original)
                twin.output[0] = new
                twin.name = f"{original.name or 'Constant'}__untied_{made}"
                copies.append((twin, original))
            node.input[k] = new
    if copies:  # insert each copied Constant node right after the one it copies (topological order kept)
        nodes = list(graph.node)
        after: dict[int, list[Any]] = {}
        for twin, original in copies:
            after.setdefault(id(original), []).append(twin)
        ordered = []
        for node in nodes:
            ordered.append(node)
            ordered.extend(after.get(id(node), []))
        del graph.node[:]
        graph.node.extend(ordered)
    return made


def untied_graph_bytes(data: bytes) -> tuple[bytes, int]:
    """The ONNX model ``data`` with its shared constants untied (``untie_constants``), serialised
    again, and the number of copies made. ``data`` itself is not changed."""
    onnx = _import_onnx()
    model = onnx.ModelProto()
    model.ParseFromString(data)
    made = untie_constants(model)
    return model.SerializeToString(), made


def compile_step(data: bytes, threads: int = 0, streams: int = 1) -> Any:
    """An OpenVINO ``CompiledModel`` of the ONNX bytes ``data`` on the CPU plugin, f32.

    ``threads``: inference threads (0: the plugin's default, every core); ``streams``: how
    many requests may run at once, each on a stream of ``threads // streams`` threads.
    The caller unties ``data`` first (``untied_graph_bytes``)."""
    ov = _import_openvino()
    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": streams,
                              # other processes share these cores: do not pin threads to them
                              "ENABLE_CPU_PINNING": False}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    if streams == 1:
        config["PERFORMANCE_HINT"] = "LATENCY"
    return core.compile_model(core.read_model(data), "CPU", config)


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 0, loops: int | None = None,
                 streams: int = 1):
        """``threads``: CPU threads (0: every core this process may use); ``loops``: loops
        that may run side by side on a batch (default ``threads``, or every core); 1 runs
        one loop whose graph uses every thread. ``streams`` > 1 (set by ``serial`` for the
        loops side by side): requests run asynchronously, each on a stream of
        ``threads // streams`` threads."""
        super().__init__(bundle)
        self._ov = _import_openvino()
        if device != "cpu":
            raise ConfigError(f"the openvino backend runs on the cpu, not {device!r} (its GPU plugin is not "
                              "supported here)")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ConfigError(f"threads must be an integer >= 0, got {threads!r}")
        if loops is not None and (isinstance(loops, bool) or not isinstance(loops, int) or loops < 1):
            raise ConfigError(f"loops must be an integer >= 1, got {loops!r}")
        from eproj.runtime.backends.onnxruntime import _cpu_cores

        self.device = "cpu"
        self.threads = threads
        self.workers = loops or (threads if threads > 0 else _cpu_cores())
        self.streams = streams
        # the plugin's threads may spin between calls: the fused kernels run on the calling thread
        self.kernel_threads = 1
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ConfigError(f"streams must be an integer >= 1, got {streams!r}")
        graph, self.untied = untied_graph_bytes(bundle.graph_bytes("step"))
        self.compiled = compile_step(graph, threads, streams)
        self._compiled_forward: Any = None  # compiled by the first prepare_forward
        self._forward_lock = threading.Lock()
        self._serial: OpenVinoBackend | None = None

    def serial(self) -> "OpenVinoBackend":
        """The backend for ``workers`` loops side by side: one compiled model with a stream
        of one thread per loop (its requests run asynchronously, see the module's note)."""
        if self.workers == 1:
            return self
        if self._serial is None:
            self._serial = OpenVinoBackend(self.bundle, threads=self.workers, loops=1, streams=self.workers)
        return self._serial

    def empty(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def upload(self, dst: np.ndarray, host: np.ndarray) -> None:
        dst[...] = host

    def download(self, src: np.ndarray) -> np.ndarray:
        return src.copy()

    def prepare_step(self, x: np.ndarray, reconstruction: np.ndarray, loss: np.ndarray,
                     grad: np.ndarray) -> Callable[[], None]:
        if self.compiled is None:
            raise ConfigError("this openvino backend is closed")
        return self._request(self.compiled, x, {"reconstruction": reconstruction, "loss": loss, "grad": grad})

    def prepare_forward(self, x: np.ndarray, reconstruction: np.ndarray, loss: np.ndarray) -> Callable[[], None]:
        if self.compiled is None:
            raise ConfigError("this openvino backend is closed")
        if "forward" not in self.bundle.manifest["graphs"]:
            return super().prepare_forward(x, reconstruction, loss)
        with self._forward_lock:
            if self._compiled_forward is None:
                graph, _ = untied_graph_bytes(self.bundle.graph_bytes("forward"))
                self._compiled_forward = compile_step(graph, self.threads, self.streams)
        return self._request(self._compiled_forward, x, {"reconstruction": reconstruction, "loss": loss})

    def _request(self, compiled: Any, x: np.ndarray, given: dict[str, np.ndarray]) -> Callable[[], None]:
        """A call of an infer request of ``compiled`` whose input wraps ``x`` and whose outputs wrap
        the buffers named in ``given``; the outputs not given (the VAE step's kl and kl_grad) get
        buffers of their own."""
        ov = self._ov
        for name, buffer in (("x", x), *given.items()):
            if not (isinstance(buffer, np.ndarray) and buffer.dtype == np.float32 and buffer.flags.c_contiguous):
                raise RuntimeError(f"graph buffer {name} must be a C-contiguous float32 NumPy array, got "
                                   f"{type(buffer).__name__} {getattr(buffer, 'dtype', '')}")
        shape = tuple(x.shape)
        request = compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(x, shared_memory=True))
        extra = {"kl": self.empty((shape[0],), "float32"), "kl_grad": self.empty(shape, "float32")}
        keep = [x]
        known = {**given, **extra}
        # each output's tensor names (an output may carry an inner node's name too)
        for index, names in enumerate(set(output.get_names()) for output in compiled.outputs):
            found = sorted(names & set(known))
            if len(found) != 1:
                raise RuntimeError(f"graph output {index} has names {sorted(names)}; expected one of {sorted(known)}")
            buffer = known[found[0]]
            keep.append(buffer)
            request.set_output_tensor(index, ov.Tensor(buffer, shared_memory=True))
        if self.streams > 1:
            def step() -> None:
                request.start_async()
                request.wait()
        else:
            def step() -> None:
                request.infer()

        step.buffers = keep  # type: ignore[attr-defined]  # keep the shared memory alive with the call
        step.request = request  # type: ignore[attr-defined]
        return step

    def close(self) -> None:
        """Release the compiled models (and the one of the loops side by side). Idempotent."""
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        self.compiled = None
        self._compiled_forward = None

    def describe(self) -> str:
        version = self._ov.get_version().split("-")[0]
        loops = f", {self.workers} loops side by side on batches" if self.workers > 1 else ""
        return f"openvino {version} (CPU plugin, f32, {self.untied} shared weights untied{loops})"
