"""The TensorRT engine builder and the engine records: what runs without TensorRT here (a
recording fake of ``tensorrt`` stands in for the builder), what needs it (skipped
without it), and the type check against the real TensorRT 10.3 and 11.4 Python API."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eproj.bundle import load_manifest
from eproj.cli import main
from eproj.engines import EngineError, EngineTarget, check_target, require_tensorrt, verify_engine
from eproj.export.tensorrt import build_engines

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "eproj" / "models" / "brick-l2ae.pt"
VERSIONS = ("10.3.0", "11.4.0.106")
GPU = EngineTarget("", "NVIDIA Jetson AGX Orin", "8.7")


def _load(name: str):
    path = ROOT / "tests" / "tensorrt_stubs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tensorrt_stubs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fakes = _load("fakes")


def _tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except EngineError:
        return False
    return True


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Bundles of the brick model with and without the fp16 step graph (copy before changing them)."""
    from eproj.export.onnx_graphs import export_bundle

    root = tmp_path_factory.mktemp("trt")
    export_bundle(MODEL, root / "fp16", fp16=True)
    shutil.copytree(root / "fp16", root / "fp32")
    manifest = json.loads((root / "fp32" / "manifest.json").read_text())
    del manifest["graphs"]["step_fp16"], manifest["files"]["step_fp16.onnx"]
    (root / "fp32" / "step_fp16.onnx").unlink()
    (root / "fp32" / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def bundle(exported, tmp_path):
    return Path(shutil.copytree(exported / "fp16", tmp_path / "bundle"))


def _fake(monkeypatch, version: str):
    """A fake TensorRT of ``version`` on a fake Orin, for build_engines."""
    trt, _ = fakes.install(monkeypatch, version)
    monkeypatch.setattr("eproj.export.tensorrt.current_target",
                        lambda v: EngineTarget(v, GPU.gpu, GPU.compute_capability))
    return trt


@pytest.mark.skipif(_tensorrt_available(), reason="TensorRT is installed here")
def test_missing_tensorrt_is_said_plainly(bundle, capsys):
    assert main(["build-engine", str(bundle)]) == 2
    assert "TensorRT is not installed: `pip install tensorrt`" in capsys.readouterr().err


@pytest.mark.parametrize("batch", [(8, 4, 16), (0, 1, 1), (1, 8, 4)])
def test_bad_batch_range(bundle, batch):
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        build_engines(bundle, min_batch=batch[0], opt_batch=batch[1], max_batch=batch[2])


@pytest.mark.parametrize("version", VERSIONS)
def test_fp32_engines_are_strongly_typed_without_tf32_and_recorded(bundle, monkeypatch, version):
    trt = _fake(monkeypatch, version)
    engines = build_engines(bundle, min_batch=2, opt_batch=4, max_batch=16, workspace_mb=64)
    assert [p.name for p in engines] == ["step.engine", "encoder.engine", "decoder.engine"]
    assert trt.parsed == ["step.onnx", "encoder.onnx", "decoder.onnx"]
    assert [n.flags for n in trt.networks] == [1 << 5] * 3  # STRONGLY_TYPED, from the enum
    for config in trt.configs:
        assert config.set == [] and config.cleared == ["BuilderFlag.TF32"]
        assert config.pool == {"MemoryPoolType.WORKSPACE": 64 << 20}
        assert len(config.profiles) == 1
    assert trt.configs[0].profiles[0].shapes == {"x": ([2, 1, 128, 128], [4, 1, 128, 128], [16, 1, 128, 128])}
    assert trt.configs[2].profiles[0].shapes["z"][2] == [16, 100]
    manifest = load_manifest(bundle)  # the graphs' hashes still hold
    record = manifest["engines"]["step"]
    assert record["file"] == "step.engine" and record["graph"] == "step.onnx"
    assert record["graph_sha256"] == manifest["files"]["step.onnx"]["sha256"]
    assert (record["tensorrt"], record["gpu"], record["compute_capability"]) == (version, GPU.gpu, "8.7")
    assert record["batch"] == {"min": 2, "opt": 4, "max": 16}
    assert (record["precision"], record["tf32"]) == ("fp32", False)
    assert sorted(manifest["engines"]) == ["decoder", "encoder", "step"]
    assert (bundle / "timing.cache").read_bytes() == b"timing cache"
    here = EngineTarget(version, GPU.gpu, GPU.compute_capability)
    assert verify_engine(bundle, manifest, "step", here)["sha256"] == record["sha256"]


@pytest.mark.parametrize("version", VERSIONS)
def test_tf32_only_when_asked(bundle, monkeypatch, version):
    trt = _fake(monkeypatch, version)
    build_engines(bundle, tf32=True)
    assert all(c.set == ["BuilderFlag.TF32"] and c.cleared == [] for c in trt.configs)
    assert load_manifest(bundle)["engines"]["step"]["tf32"] is True


@pytest.mark.parametrize("version", VERSIONS)
def test_fp16_builds_the_engine_the_runtime_loads_from_the_mixed_precision_graph(bundle, monkeypatch, version):
    trt = _fake(monkeypatch, version)
    assert [p.name for p in build_engines(bundle, fp16=True)] == ["step_fp16.engine"]
    assert trt.parsed == ["step_fp16.onnx"]
    assert trt.networks[0].flags == 1 << 5
    assert "BuilderFlag.FP16" not in trt.configs[0].set  # the graph's types decide, not a builder flag
    record = load_manifest(bundle)["engines"]["step_fp16"]
    assert (record["file"], record["graph"], record["precision"]) == ("step_fp16.engine", "step_fp16.onnx", "fp16")


def test_fp16_without_the_fp16_graph_says_to_export_with_fp16(exported, monkeypatch, tmp_path, capsys):
    _fake(monkeypatch, "11.4.0.106")
    folder = shutil.copytree(exported / "fp32", tmp_path / "bundle")
    with pytest.raises(EngineError, match=r"no step_fp16 graph.*eproj export RUN --out .* --fp16"):
        build_engines(folder, fp16=True)
    assert main(["build-engine", str(folder), "--fp16"]) == 2
    assert "no step_fp16 graph" in capsys.readouterr().err
    assert not list(Path(folder).glob("*.engine"))


def test_the_parser_outlives_the_build(bundle, monkeypatch):
    """The fake fails a build whose parser is gone: what the builder did before this change."""
    from eproj.export import tensorrt as builder

    _fake(monkeypatch, "10.3.0")
    parse = builder._parse
    monkeypatch.setattr(builder, "_parse", lambda *args: (parse(*args)[0], None))  # the parser dropped at once
    with pytest.raises(RuntimeError, match="parser was freed"):
        build_engines(bundle)


def _built(bundle: Path, monkeypatch, version: str = "10.3.0") -> dict:
    _fake(monkeypatch, version)
    build_engines(bundle)
    build_engines(bundle, fp16=True)
    return load_manifest(bundle)


def test_an_engine_is_refused_when_its_bytes_or_graph_changed(bundle, monkeypatch):
    manifest = _built(bundle, monkeypatch)
    here = EngineTarget("10.3.0", GPU.gpu, GPU.compute_capability)
    other = dict(manifest, engines=dict(manifest["engines"], step=dict(manifest["engines"]["step"],
                                                                          graph_sha256="0" * 64)))
    with pytest.raises(EngineError, match=r"built from a step.onnx .*exported again.*`eproj build-engine "):
        verify_engine(bundle, other, "step", here)
    (bundle / "step_fp16.engine").write_bytes(b"another engine")
    with pytest.raises(EngineError, match=r"step_fp16.engine has SHA-256 .*replaced.*build-engine .* --fp16`"):
        verify_engine(bundle, manifest, "step_fp16", here)
    (bundle / "encoder.engine").unlink()
    with pytest.raises(EngineError, match="encoder.engine is missing"):
        verify_engine(bundle, manifest, "encoder", here)
    del manifest["engines"]
    with pytest.raises(EngineError, match=r"no step engine recorded.*`eproj build-engine "):
        verify_engine(bundle, manifest, "step", here)


@pytest.mark.parametrize("built, here, says", [
    ("10.3.0", "11.4.0.106", r"TensorRT '10.3.0', here '11.4.0.106' \(another major version"),
    ("11.4.0.106", "10.3.0", r"another major version"),
    ("10.3.0", "10.16.1", r"TensorRT '10.3.0', here '10.16.1' \(another version; an engine loads only"),
])
def test_an_engine_of_another_tensorrt_is_refused(bundle, monkeypatch, built, here, says):
    manifest = _built(bundle, monkeypatch, built)
    with pytest.raises(EngineError, match=says + r".*Rebuild it with `eproj build-engine "):
        verify_engine(bundle, manifest, "step", EngineTarget(here, GPU.gpu, GPU.compute_capability))


def test_an_engine_for_another_gpu_is_refused(tmp_path):
    record = {"tensorrt": "10.3.0", "gpu": GPU.gpu, "compute_capability": "8.7"}
    check_target(record, EngineTarget("10.3.0", GPU.gpu, "8.7"), "step.engine", "`eproj build-engine B`")
    with pytest.raises(EngineError, match=r"gpu 'NVIDIA Jetson AGX Orin', here 'NVIDIA H100 80GB HBM3'; "
                                          r"compute_capability '8.7', here '9.0'\. "
                                          r"Rebuild it with `eproj build-engine B`"):
        check_target(record, EngineTarget("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"), "step.engine",
                     "`eproj build-engine B`")


def test_exporting_again_removes_the_stale_engines(bundle, monkeypatch):
    from eproj.export.onnx_graphs import export_bundle

    _built(bundle, monkeypatch)
    (bundle / "step.engine.json").write_text("{}")  # the side record of older eproj versions
    export_bundle(MODEL, bundle)
    assert not list(bundle.glob("*.engine")) and not (bundle / "step.engine.json").exists()
    assert "engines" not in load_manifest(bundle)


@pytest.mark.skipif(not _tensorrt_available(), reason="needs TensorRT 10 or 11 and an NVIDIA GPU")
def test_build_and_load_engines(bundle):
    from eproj.engines import current_target
    from eproj.runtime.backends.tensorrt import load_engine
    from eproj.runtime.bundle import Bundle

    engines = build_engines(bundle, min_batch=1, opt_batch=2, max_batch=4, workspace_mb=256)
    assert [p.name for p in engines] == ["step.engine", "encoder.engine", "decoder.engine"]
    assert build_engines(bundle, fp16=True, max_batch=4)[0].name == "step_fp16.engine"
    loaded = Bundle.load(bundle)
    for graph in ("step", "encoder", "decoder", "step_fp16"):
        assert load_engine(loaded, graph).engine is not None
    here = current_target(require_tensorrt())
    with pytest.raises(EngineError, match="Rebuild"):
        verify_engine(bundle, loaded.manifest, "step", EngineTarget(here.tensorrt, "another GPU", "1.0"))


# -- the type check against the real TensorRT API ------------------------------------------

@pytest.mark.parametrize("major", ["10", "11"])
def test_tensorrt_modules_type_check_against_the_real_bindings(major, tmp_path):
    """mypy over the TensorRT modules (pyproject's [tool.mypy] files) with stubs generated from
    the real bindings of TensorRT 10.3 and 11.4 (tests/tensorrt_stubs/build.py, cached in
    build/tensorrt-stubs/); skipped only when the wheel cannot be downloaded."""
    stubs_builder = _load("build")
    try:
        stubs = stubs_builder.build(major)
    except stubs_builder.StubsUnavailable as error:
        pytest.skip(f"no TensorRT {major} bindings to generate stubs from: {error}")
    cache = stubs.parent / "mypy-cache"
    env = {**os.environ, "MYPYPATH": str(stubs)}

    def mypy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        # one cache per configuration: mypy drops a cache written under other options
        kind = "project" if cwd == ROOT else "probe"
        return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache / kind), *args], cwd=cwd,
                              capture_output=True, text=True, env=env)

    # the stubs are the ones mypy reads: TensorRT 11 has no weakly typed flags, 10 has them
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\nflag = trt.BuilderFlag.FP16\nversion: str = trt.__version__\n")
    result = mypy("--config-file=", str(probe), cwd=tmp_path)
    if major == "11":
        assert 'has no attribute "FP16"' in result.stdout, result.stdout + result.stderr
    else:
        assert result.returncode == 0, result.stdout + result.stderr
    result = mypy()
    assert result.returncode == 0, f"mypy against TensorRT {major} stubs:\n{result.stdout}{result.stderr}"
