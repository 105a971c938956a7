"""The openvino backend: the untying of shared weights, the step graph against ONNX Runtime
(the reference backend of the parity tests), the OpenVINO finding that makes the untying
necessary, and the errors. Skipped where OpenVINO is not installed, except the test of the
error that says how to install it.

Tolerance: step outputs within 1e-4 of the largest magnitude of ONNX Runtime's, per output
(measured: 2.4e-6 for the reconstruction, 1.1e-5 for the gradient on the brick model).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from eproj.errors import ConfigError
from eproj.runtime.backends import create_backend
from eproj.runtime.bundle import Bundle
from eproj.train.models import FAMILIES

TOLERANCE = 1e-4


@pytest.fixture
def ov():
    return pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino onnx)")


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _conv_then_transpose(channels: int, shared: bool) -> tuple[bytes, np.ndarray]:
    """ONNX bytes of y = ConvTranspose(Conv(x, W), W) with a (C, C, 3, 3) W (one initializer
    read by both nodes, or two equal copies), and W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((channels, channels, 3, 3)).astype(np.float32)
    second = "W" if shared else "W_copy"
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["h", second], ["y"], pads=[1, 1, 1, 1])]
    initializers = [numpy_helper.from_array(weight, "W")]
    if not shared:
        initializers.append(numpy_helper.from_array(weight, "W_copy"))
    graph = helper.make_graph(nodes, "conv_then_transpose",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, channels, 16, 16])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString(), weight


def _reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The same computation in plain torch."""
    w = torch.from_numpy(weight)
    with torch.no_grad():
        return torch.nn.functional.conv_transpose2d(
            torch.nn.functional.conv2d(torch.from_numpy(x), w, padding=1), w, padding=1).numpy()


def _run_openvino(data: bytes, x: np.ndarray) -> np.ndarray:
    from eproj.runtime.backends.openvino import compile_step

    compiled = compile_step(data, threads=1)
    return compiled({"x": x})[compiled.output(0)]


def test_openvino_misreads_a_weight_shared_by_conv_and_conv_transpose(ov):
    """The finding behind ``untie_constants``, kept as a regression check. OpenVINO 2026.4's CPU
    plugin returns a wrong result when one (C, C, k, k) initializer, C > 1, feeds a Conv and a
    ConvTranspose (measured relative error 1.1-1.2 for C = 8); the same graph with two copies of
    the weight is right. While the bug is there this test is an expected failure (xfail, with
    the error measured); when an OpenVINO release fixes it, it passes, and the untying may go."""
    x = np.random.default_rng(1).random((2, 8, 16, 16), dtype=np.float32)
    shared, weight = _conv_then_transpose(8, shared=True)
    tied, _ = _conv_then_transpose(8, shared=False)
    want = _reference(x, weight)
    assert _relative(_run_openvino(tied, x), want) <= TOLERANCE  # two copies: right
    error = _relative(_run_openvino(shared, x), want)
    if error > TOLERANCE:
        pytest.xfail(f"OpenVINO {ov.get_version()} still misreads a weight shared by a Conv and a ConvTranspose "
                     f"(relative error {error:.2f}); the openvino backend unties such weights")


def test_untied_shared_weight_is_right_in_openvino(ov):
    from eproj.runtime.backends.openvino import untied_graph_bytes

    shared, weight = _conv_then_transpose(8, shared=True)
    untied, made = untied_graph_bytes(shared)
    assert made == 1
    x = np.random.default_rng(1).random((3, 8, 16, 16), dtype=np.float32)
    assert _relative(_run_openvino(untied, x), _reference(x, weight)) <= TOLERANCE


def test_untie_constants_gives_each_reader_its_own_copy():
    """Initializers and Constant-node outputs read more than once get one copy per extra
    reader, with equal values; the model stays valid and computes the same (ONNX Runtime);
    the bytes passed in are not changed."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from eproj.runtime.backends.openvino import untie_constants, untied_graph_bytes

    a = numpy_helper.from_array(np.arange(4, dtype=np.float32), "a")
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full(4, 2, np.float32))),
             helper.make_node("Add", ["x", "a"], ["s"]), helper.make_node("Mul", ["s", "a"], ["t"]),
             helper.make_node("Add", ["t", "c"], ["u"]), helper.make_node("Mul", ["u", "c"], ["v"]),
             helper.make_node("Add", ["v", "v"], ["y"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [a])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    untied_bytes, made = untied_graph_bytes(data)
    assert made == 2 and data == model.SerializeToString()
    untied = onnx.ModelProto()
    untied.ParseFromString(untied_bytes)
    onnx.checker.check_model(untied)
    constants = {t.name for t in untied.graph.initializer} | \
        {n.output[0] for n in untied.graph.node if n.op_type == "Constant"}
    reads = [name for node in untied.graph.node for name in node.input if name in constants]
    assert len(reads) == len(set(reads)) == 4  # a, c and one copy of each
    x = np.array([1, -2, 3, 0.5], np.float32)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(untied_bytes, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    assert untie_constants(untied) == 0  # nothing left to untie


def test_untie_constants_refuses_subgraphs():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from eproj.runtime.backends.openvino import untie_constants

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "branch", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch, name="choose")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ConfigError, match=r"node 'choose' \(If\) holds a subgraph"):
        untie_constants(helper.make_model(graph))


def _ort_step(bundle: Bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(bundle.graph_bytes("step"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x})))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loops", [1, 2])
def test_openvino_step_matches_onnxruntime(ov, bundles, family, loops):
    """The step graph through the backend's bound buffers (one loop: a synchronous request;
    two: the loops' compiled model, requests on streams) against ONNX Runtime's."""
    from eproj.runtime.backends.openvino import OpenVinoBackend

    bundle = Bundle.load(bundles[family][1])
    backend = OpenVinoBackend(bundle, "cpu", threads=2, loops=loops)
    runner = backend.serial()
    assert (runner is backend) == (loops == 1) and runner.untied > 0
    for n in (1, 3):
        x = np.random.default_rng(n).random((n, bundle.channels, bundle.size, bundle.size), dtype=np.float32)
        buffers = [runner.empty(x.shape, "float32"), runner.empty(x.shape, "float32"), runner.empty((n,), "float32"),
                   runner.empty(x.shape, "float32")]
        step = runner.prepare_step(*buffers)
        runner.upload(buffers[0], x)
        step()
        want = _ort_step(bundle, x)
        for name, got in zip(("reconstruction", "loss", "grad"), buffers[1:]):
            assert _relative(got, want[name]) <= TOLERANCE, (name, _relative(got, want[name]))
        runner.upload(buffers[0], x[::-1].copy())  # the bound input is read again on the next call
        step()
        assert _relative(buffers[3], _ort_step(bundle, x[::-1].copy())["grad"]) <= TOLERANCE
    backend.close()
    backend.close()
    with pytest.raises(ConfigError, match="closed"):
        backend.prepare_step(*buffers)


@pytest.mark.parametrize("family", FAMILIES)
def test_openvino_forward_matches_onnxruntime(ov, bundles, family):
    """The forward graph on the loops' compiled model (requests on streams) against ONNX Runtime's step."""
    from eproj.runtime.backends.openvino import OpenVinoBackend

    bundle = Bundle.load(bundles[family][1])
    backend = OpenVinoBackend(bundle, "cpu", threads=2, loops=2)
    runner = backend.serial()
    x = np.random.default_rng(3).random((3, bundle.channels, bundle.size, bundle.size), dtype=np.float32)
    buffers = [runner.empty(x.shape, "float32"), runner.empty(x.shape, "float32"), runner.empty((3,), "float32")]
    forward = runner.prepare_forward(*buffers)
    runner.upload(buffers[0], x)
    forward()
    want = _ort_step(bundle, x)
    for name, got in zip(("reconstruction", "loss"), buffers[1:]):
        assert _relative(got, want[name]) <= TOLERANCE, (name, _relative(got, want[name]))
    backend.close()
    with pytest.raises(ConfigError, match="closed"):
        backend.prepare_forward(*buffers)


def test_the_shared_step_graph_is_wrong_in_openvino_without_untying(ov, bundles):
    """The bundle's own step graph, shared weights and all, gives a wrong gradient in OpenVINO
    (while the bug is there: xfail, with the error measured); the reconstruction is right."""
    from eproj.runtime.backends.openvino import compile_step

    bundle = Bundle.load(bundles["l2ae"][1])
    x = np.random.default_rng(0).random((2, bundle.channels, bundle.size, bundle.size), dtype=np.float32)
    compiled = compile_step(bundle.graph_bytes("step"), threads=1)
    got = compiled({"x": x})
    want = _ort_step(bundle, x)
    assert _relative(got[compiled.output("reconstruction")], want["reconstruction"]) <= TOLERANCE
    error = _relative(got[compiled.output("grad")], want["grad"])
    if error > TOLERANCE:
        pytest.xfail(f"OpenVINO {ov.get_version()}: the step graph's gradient with shared weights has relative "
                     f"error {error:.2f}")


def test_a_missing_openvino_says_what_to_install(bundles, monkeypatch):
    from eproj.runtime.backends.openvino import OpenVinoBackend

    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails, as where it is not installed
    with pytest.raises(ConfigError, match=r"pip install openvino"):
        OpenVinoBackend(Bundle.load(bundles["l2ae"][1]))


def test_auto_passes_over_a_missing_openvino(bundles, monkeypatch):
    import importlib.util

    from eproj.runtime import backends

    real = importlib.util.find_spec
    missing = {"openvino", "onnxruntime", "torch"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    bundle = Bundle.load(bundles["l2ae"][1])
    assert backends._unavailable(bundle, "openvino", "cpu", None) == \
        "openvino not installed (pip install openvino onnx)"
    with pytest.raises(ConfigError, match=r"no backend can run this bundle on cpu here: .*openvino on cpu \(openvino "
                                          r"not installed"):
        create_backend(bundle, "auto", "cpu")


@pytest.mark.parametrize("options, message", [
    (dict(precision="fp16"), r"the openvino backend does not take precision='fp16'"),
    (dict(device="cuda"), r"runs on the cpu, not 'cuda'"),
    (dict(loops=0), r"loops must be an integer >= 1, got 0"),
    (dict(threads=-1), r"threads must be an integer >= 0, got -1")])
def test_openvino_options_are_checked(ov, bundles, options, message):
    with pytest.raises(ConfigError, match=message):
        create_backend(Bundle.load(bundles["l2ae"][1]), "openvino", **options)


def test_openvino_is_picked_by_name_and_described(ov, bundles):
    backend, note = create_backend(Bundle.load(bundles["l2ae"][1]), "openvino", threads=2)
    assert note.startswith("openvino ") and "CPU plugin, f32" in note and note.endswith(", as asked")
    assert backend.workers == 2 and backend.serial().streams == 2
    backend.close()
