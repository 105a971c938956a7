"""The TensorRT engine builder: what runs without TensorRT here, and what needs it (skipped without it)."""

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from eproj.cli import main
from eproj.export.tensorrt import EngineError, EngineTarget, build_engines, check_target, require_tensorrt

ROOT = Path(__file__).resolve().parents[2]


def _tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except EngineError:
        return False
    return True


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from eproj.export.onnx_graphs import export_bundle
    from eproj.train import demo

    out = tmp_path_factory.mktemp("trt") / "bundle"
    export_bundle(demo.MODELS_DIR / "brick-l2ae.pt", out)
    return out


@pytest.mark.skipif(_tensorrt_available(), reason="TensorRT is installed here")
def test_missing_tensorrt_is_said_plainly(bundle, capsys):
    assert main(["build-engine", str(bundle)]) == 2
    assert "TensorRT is not installed: `pip install tensorrt`" in capsys.readouterr().err


def test_bad_batch_range(bundle):
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        build_engines(bundle, min_batch=8, opt_batch=4, max_batch=16)


def test_an_engine_for_another_setup_is_refused_with_a_rebuild_hint(tmp_path):
    here = EngineTarget("10.13.0", "NVIDIA H100 80GB HBM3", "9.0")
    check_target(tmp_path / "step.engine", {"tensorrt": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3",
                                            "compute_capability": "9.0"}, here)
    with pytest.raises(EngineError, match=r"tensorrt '10.0.1' \(here '10.13.0'\).*eproj build-engine"):
        check_target(tmp_path / "step.engine", {"tensorrt": "10.0.1", "gpu": "NVIDIA H100 80GB HBM3",
                                                "compute_capability": "9.0"}, here)
    with pytest.raises(EngineError, match=r"gpu 'Orin' \(here .*compute_capability '8.7'"):
        check_target(tmp_path / "step.engine", {"tensorrt": "10.13.0", "gpu": "Orin",
                                                "compute_capability": "8.7"}, here)


@pytest.mark.skipif(not _tensorrt_available(), reason="needs TensorRT 10 and an NVIDIA GPU")
def test_build_and_load_engines(bundle):
    from eproj.export.tensorrt import load_engine

    engines = build_engines(bundle, min_batch=1, opt_batch=2, max_batch=4, workspace_mb=256)
    assert [p.name for p in engines] == ["step.engine", "encoder.engine", "decoder.engine"]
    assert (bundle / "timing.cache").is_file()
    for path in engines:
        record = json.loads(path.with_name(path.name + ".json").read_text())
        assert record["batch"] == {"min": 1, "opt": 2, "max": 4}
        assert load_engine(path) is not None
    record_path = bundle / "step.engine.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "gpu": "another GPU"}))
    with pytest.raises(EngineError, match="Rebuild"):
        load_engine(bundle / "step.engine")


def _sanitised_stubs(folder: Path) -> Path:
    """A copy of the tensorrt-stubs package that mypy can parse.

    The generated stubs (10.13.0.35.1) name some plugin parameters `in`, a keyword,
    and give one parameter no default after defaulted ones; only those lines change.
    """
    import re

    files = [f for f in metadata.files("tensorrt-stubs") or [] if f.suffix == ".pyi"]
    for f in files:
        target = folder / str(f)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = Path(f.locate()).read_text()
        text = re.sub(r"([(, ])in: ", r"\1in_: ", text)
        text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
        target.write_text(text)
    return folder


def test_tensorrt_module_type_checks(tmp_path):
    try:
        metadata.version("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.fail("tensorrt-stubs is missing: `make test` installs it with pip --no-deps")
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mypy is missing: it comes with eproj[test]")
    stubs = _sanitised_stubs(tmp_path / "stubs")
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, capture_output=True, text=True,
                            env={"MYPYPATH": str(stubs), "PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 0, result.stdout + result.stderr
