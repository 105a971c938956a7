"""A runtime-only install (``pip install eproj``): ONNX Runtime comes with it, so
``eproj run`` and ``eproj bench`` inspect on the CPU; the training side's
commands say which extra to install. The install is simulated in a subprocess
where torch, scikit-learn, scikit-image and onnx cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import contextlib, io, json, sys
for name in ("torch", "sklearn", "skimage", "onnx"):
    sys.modules[name] = None  # import fails with ModuleNotFoundError, as where it is not installed
from eproj.cli import main
outcomes = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
        except BaseException as error:
            status = f"uncaught {type(error).__name__}: {error}"
    outcomes.append({"argv": argv, "status": status, "stderr": err.getvalue()})
print(json.dumps(outcomes))
"""


def _without_training_side(commands: list[list[str]]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_onnxruntime_is_a_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "onnxruntime" in runtime and "torch" not in runtime
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["train"])


def test_run_and_bench_work_and_the_training_commands_name_the_extra(bundles, tmp_path):
    bundle = str(bundles["l2ae"][1])
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.full((32, 32), 120, np.uint8))
    run = tmp_path / "run"
    run.mkdir()
    training_side = [
        ["train", "--data", "textures:brick", "--model", "l2ae", "--out", str(run)],
        ["calibrate", str(run)],
        ["eval", str(run), "--json", str(tmp_path / "e.json")],
        ["export", str(run), "--out", str(tmp_path / "b")],
        ["report", str(run), "--out", str(tmp_path / "r")],
        ["sweep", "--data", "textures:brick", "--parameter", "beta", "--values", "1", "--out", str(tmp_path / "s")],
        ["demo", "--out", str(tmp_path / "d")],
    ]
    runtime_side = [
        ["run", bundle, "--max-iters", "1", "--source", str(tmp_path / "in"), "--out", str(tmp_path / "o")],
        ["bench", bundle, "--batch", "1", "--iters", "1", "--warmup", "0", "--repeats", "1",
         "--json", str(tmp_path / "bench.json")],
    ]
    outcomes = _without_training_side(training_side + runtime_side)
    for outcome in outcomes[:len(training_side)]:
        assert outcome["status"] == 2, outcome
        assert "pip install 'eproj[train]'" in outcome["stderr"] and "runtime-only install" in outcome["stderr"], \
            outcome
    for outcome in outcomes[len(training_side):]:
        assert outcome["status"] == 0, outcome
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 1
    row, = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["reference_eager_autograd"]["available"] is False
