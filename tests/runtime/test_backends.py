"""Backend pieces that a GPU would run, checked here without one: ONNX Runtime's CUDA
upload path, the torch step program on a device other than the CPU, resource release."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eproj.bundle import BundleError
from eproj.runtime.backends.onnxruntime import OnnxRuntimeBackend, _OrtCudaArray
from eproj.runtime.backends.torch import TorchBackend, load_step_program
from eproj.runtime.bundle import Bundle


class _DeviceValue:
    """Stands for an OrtValue in GPU memory: reading it back to the host is an error."""

    def __init__(self) -> None:
        self.written: list[np.ndarray] = []

    def data_ptr(self) -> int:
        return 0xD000

    def numpy(self) -> np.ndarray:
        raise AssertionError("the upload copied the whole device buffer to the host")

    def update_inplace(self, array: np.ndarray) -> None:
        self.written.append(array)


@pytest.mark.parametrize("dtype", ["float32", "uint8", "int32"])
def test_ort_cuda_upload_does_not_read_the_device_buffer(dtype):
    backend = OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)  # the upload path alone, no CUDA session
    backend.device = "cuda"
    value = _DeviceValue()
    buffer = _OrtCudaArray(value, (2, 3), dtype)
    assert buffer.__cuda_array_interface__["data"] == (0xD000, False)
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    backend.upload(buffer, host)
    assert len(value.written) == 1 and value.written[0].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(value.written[0], host.astype(dtype))


@pytest.mark.parametrize("family", ["l2ae", "dsae", "vae", "gvae"])
def test_torch_step_program_runs_on_another_device(bundles, family):
    """The program is moved whole: on the meta device no constant may stay behind on the CPU."""
    bundle = Bundle.load(bundles[family][1])
    module = load_step_program(bundle, "meta")
    x = torch.empty(3, bundle.channels, bundle.size, bundle.size, device="meta")
    outputs = module(x)
    assert all(o.device.type == "meta" for o in outputs)
    assert tuple(outputs[0].shape) == tuple(x.shape) and tuple(outputs[1].shape) == (3,)


def test_torch_step_program_matches_the_step_module(bundles):
    from eproj.export.step import StepModule

    trained, folder = bundles["gvae"]
    module = load_step_program(Bundle.load(folder), "cpu")
    x = torch.rand(5, trained.model.config.channels, trained.model.config.size, trained.model.config.size)
    with torch.no_grad():
        want = StepModule(trained.model.float().eval())(x)
        got = module(x)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_torch_forward_program_matches_the_forward_module(bundles):
    from eproj.export.step import StepModule
    from eproj.runtime.backends.torch import load_forward_program

    trained, folder = bundles["dsae"]
    module = load_forward_program(Bundle.load(folder), "cpu")
    x = torch.rand(4, trained.model.config.channels, trained.model.config.size, trained.model.config.size)
    with torch.no_grad():
        want = StepModule(trained.model.float().eval(), gradient=False)(x)
        got = module(x)
    assert len(got) == 2
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _without_forward(folder, tmp_path):
    """A copy of bundle ``folder`` as exported before the forward graph: no forward.onnx, no forward.pt2."""
    import json
    import shutil

    copy = tmp_path / "old-bundle"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["graphs"].pop("forward")
    manifest.pop("torch_forward")
    for name in ("forward.onnx", "forward.pt2"):
        manifest["files"].pop(name)
        (copy / name).unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "openvino"])
@pytest.mark.parametrize("exported", ["with", "without"])
def test_the_forward_pass_gives_the_steps_reconstruction_and_loss(bundles, tmp_path, backend, exported):
    """``prepare_forward`` on the bundle's forward graph, and on a bundle exported before it (the
    step graph stands in): the step's reconstruction and Lr, into the buffers given."""
    from eproj.runtime.backends import create_backend

    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino onnx)")
    folder = bundles["vae"][1] if exported == "with" else _without_forward(bundles["vae"][1], tmp_path)
    bundle = Bundle.load(folder)
    assert ("forward" in bundle.manifest["graphs"]) == (exported == "with")
    chosen, _ = create_backend(bundle, backend, "cpu")
    shape = (3, bundle.channels, bundle.size, bundle.size)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    buffers = [chosen.empty(shape, "float32"), chosen.empty(shape, "float32"), chosen.empty((3,), "float32"),
               chosen.empty(shape, "float32")]
    chosen.upload(buffers[0], x)
    chosen.prepare_step(*buffers)()
    want = [chosen.download(b) for b in buffers[1:3]]
    got = [chosen.empty(shape, "float32"), chosen.empty((3,), "float32")]
    chosen.prepare_forward(buffers[0], *got)()
    for w, g in zip(want, got):
        np.testing.assert_allclose(chosen.download(g), w, rtol=1e-5, atol=1e-6)
    chosen.close()


def test_a_bundle_without_the_forward_graph_inspects_as_before(bundles, tmp_path):
    """Gated tiles that take no step and all: the step graph stands in for the forward graph, with
    the same results."""
    from eproj.runtime import Inspector

    frames = np.random.default_rng(1).random((4, 32, 32)).astype(np.float32)
    options = dict(backend="onnxruntime", max_iters=5, fit="none", threads=1, stop_rule="training-min",
                   gate_first_update=False)
    probe = Inspector.from_bundle(bundles["l2ae"][1], **options)
    probe(list(frames))
    gate = float(np.sort(probe.last_batch.lr0)[1])  # two of the four gated
    new = Inspector.from_bundle(bundles["l2ae"][1], gate_lr=gate, **options)(list(frames))
    old = Inspector.from_bundle(_without_forward(bundles["l2ae"][1], tmp_path), gate_lr=gate, **options)(list(frames))
    assert [r.stop_reasons for r in new].count(["gate"]) == 2 and [r.iterations for r in new].count(0) == 2
    for a, b in zip(new, old):
        assert a.iterations == b.iterations and a.stop_reasons == b.stop_reasons
        np.testing.assert_allclose(a.projection, b.projection, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-5)


def test_torch_backend_needs_no_training_code(bundles, tmp_path):
    """A bundle without the torch program is refused with an export hint, even where the
    checkpoint (model.pt) is there: the backend never rebuilds the model from training code."""
    import json
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(bundles["l2ae"][1], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("torch_step")
    manifest["files"].pop("step.pt2")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="carries no torch step program"):
        TorchBackend(Bundle.load(folder), "cpu")


def test_a_damaged_torch_program_is_refused_by_its_hash(bundles, tmp_path):
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(bundles["l2ae"][1], folder)
    data = bytearray((folder / "step.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "step.pt2").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="step.pt2 has SHA-256"):
        Bundle.load(folder)


def test_parallel_projector_threads_stop_on_close(bundles):
    from eproj.config import ProjectionConfig
    from eproj.runtime.projector import ParallelProjector

    bundle = Bundle.load(bundles["l2ae"][1])
    backend = OnnxRuntimeBackend(bundle, "cpu", threads=2)
    projector = ParallelProjector(backend.serial(), 3, bundle.channels, bundle.size, ProjectionConfig(max_iters=1),
                                  0.5, workers=2)
    projector.run(np.zeros((3, bundle.channels, bundle.size, bundle.size), np.float32))
    projector.close()
    assert projector._pool._shutdown
    with pytest.raises(RuntimeError, match="shutdown"):
        projector.run(np.zeros((3, bundle.channels, bundle.size, bundle.size), np.float32))
    backend.close()
    backend.close()
    assert backend.session is None
