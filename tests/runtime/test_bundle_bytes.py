"""What is hashed is what runs: the backends build their sessions, programs and engines
from the bytes ``Bundle.graph_bytes`` / ``Bundle.file_bytes`` read and checked once, never
from a path reopened later. A file swapped on disk after ``Bundle.load`` is refused when a
backend reads it; an engine swapped after its check is never deserialized."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eproj.bundle import BundleError, write_manifest
from eproj.engines import EngineTarget
from eproj.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "eproj" / "models" / "brick-l2ae.pt"
SWAPPED = r"has SHA-256 .*\(replaced after export, or since the bundle was loaded\)"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from eproj.export.onnx_graphs import export_bundle

    folder = tmp_path_factory.mktemp("bytes") / "bundle"
    export_bundle(MODEL, folder, fp16=True)
    return folder


@pytest.fixture
def folder(exported, tmp_path):
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def _flip(path: Path) -> None:
    """The same file name and size, one byte changed."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_graph_bytes_are_the_files_and_run_like_the_file(folder):
    import onnxruntime as ort

    from eproj.runtime.backends.onnxruntime import OnnxRuntimeBackend

    bundle = Bundle.load(folder)
    for graph in ("encoder", "decoder", "step", "step_fp16"):
        assert bundle.graph_bytes(graph) == bundle.graph_path(graph).read_bytes()
    x = np.random.default_rng(0).random((2, bundle.channels, bundle.size, bundle.size), dtype=np.float32)
    by_path = ort.InferenceSession(str(folder / "step.onnx"), providers=["CPUExecutionProvider"])
    backend = OnnxRuntimeBackend(bundle, "cpu", threads=1)
    for want, got in zip(by_path.run(None, {"x": x}), backend.session.run(None, {"x": x})):
        np.testing.assert_array_equal(got, want)
    backend.close()


def test_an_unlisted_file_is_never_read(folder):
    bundle = Bundle.load(folder)
    with pytest.raises(BundleError, match=r"'manifest.json' is not listed under the manifest's files"):
        bundle.file_bytes("manifest.json")
    with pytest.raises(BundleError, match="has no step_fp16 graph"):
        Bundle(folder, {**bundle.manifest, "graphs": {"step": bundle.manifest["graphs"]["step"]}}) \
            .graph_bytes("step_fp16")


@pytest.mark.parametrize("precision, file", [("fp32", "step.onnx"), ("fp16", "step_fp16.onnx")])
def test_a_step_graph_swapped_after_load_is_refused_not_run(exported, folder, precision, file):
    """The other precision's graph (a valid ONNX graph of the same model) put in its place after
    ``Bundle.load``, then the exported graph with one byte changed: a session built from the
    path would have run either; both are refused."""
    from eproj.runtime.backends.onnxruntime import OnnxRuntimeBackend

    bundle = Bundle.load(folder)
    other = "step_fp16.onnx" if file == "step.onnx" else "step.onnx"
    shutil.copyfile(folder / other, folder / file)
    with pytest.raises(BundleError, match=rf"{file} has \d+ bytes; the manifest says \d+ \(truncated or replaced"):
        OnnxRuntimeBackend(bundle, "cpu", threads=1, precision=precision)
    shutil.copyfile(exported / file, folder / file)
    _flip(folder / file)
    with pytest.raises(BundleError, match=file.replace(".", r"\.") + " " + SWAPPED):
        OnnxRuntimeBackend(bundle, "cpu", threads=1, precision=precision)


def test_the_one_thread_sessions_made_later_read_verified_bytes(folder):
    """``serial()`` builds its one-thread session when a batch first needs it, long after load."""
    from eproj.runtime.backends.onnxruntime import OnnxRuntimeBackend

    bundle = Bundle.load(folder)
    backend = OnnxRuntimeBackend(bundle, "cpu", threads=2)
    _flip(folder / "step.onnx")
    with pytest.raises(BundleError, match=r"step\.onnx " + SWAPPED):
        backend.serial()
    backend.close()


def test_a_torch_program_swapped_after_load_is_refused(folder):
    from eproj.runtime.backends.torch import load_step_program

    bundle = Bundle.load(folder)
    assert load_step_program(bundle, "cpu") is not None
    _flip(folder / "step.pt2")
    with pytest.raises(BundleError, match=r"step\.pt2 " + SWAPPED):
        load_step_program(bundle, "cpu")


def test_an_ensemble_swapped_after_load_is_refused(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    fitted = {"features": ["rec_error", "kl_grad"], "mean": [0.0, 0.0], "scale": [1.0, 1.0], "coef": [1.0, 1.0],
              "intercept": 0.0}
    (folder / "ensemble.json").write_text(json.dumps(fitted))
    manifest["ensemble"] = {"file": "ensemble.json", "threshold": 0.5}
    write_manifest(folder, manifest)
    bundle = Bundle.load(folder)
    assert bundle.ensemble["model"] == fitted
    # another valid ensemble of the same length, written after load
    (folder / "ensemble.json").write_text(json.dumps({**fitted, "intercept": 9.0}))
    with pytest.raises(BundleError, match=r"ensemble\.json " + SWAPPED):
        bundle.ensemble


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0.106"])
def test_an_engine_swapped_after_its_check_is_never_deserialized(folder, monkeypatch, version):
    """The engine file is replaced on disk right after its record is checked (the last step of the
    check): the bytes deserialized are still the ones whose SHA-256 was checked."""
    import eproj.engines
    from eproj.export.tensorrt import build_engines
    from eproj.runtime.backends.tensorrt import load_engine

    spec = importlib.util.spec_from_file_location("tensorrt_stubs_fakes",
                                                  ROOT / "tests" / "tensorrt_stubs" / "fakes.py")
    fakes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fakes)
    fakes.install(monkeypatch, version, cuda=True)
    here = lambda v: EngineTarget(v, "NVIDIA Jetson AGX Orin", "8.7")  # noqa: E731
    monkeypatch.setattr("eproj.export.tensorrt.current_target", here)
    monkeypatch.setattr("eproj.runtime.backends.tensorrt.current_target", here)
    build_engines(folder, min_batch=1, opt_batch=2, max_batch=4)
    bundle = Bundle.load(folder)
    built = (folder / "step.engine").read_bytes()
    check_target = eproj.engines.check_target

    def check_then_swap(*args, **kwargs):
        check_target(*args, **kwargs)
        (folder / "step.engine").write_bytes(b"an engine put in place after the check")

    monkeypatch.setattr(eproj.engines, "check_target", check_then_swap)
    loaded = load_engine(bundle, "step")
    assert loaded.engine.data == built
    assert (folder / "step.engine").read_bytes() != built
