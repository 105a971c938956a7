"""eproj run and eproj bench end to end: a folder with a broken image, a video
made by OpenCV, a run killed half-way and resumed, bad sources, folders and
bundles on the command line. (The sources' own cases are in test_sources.py,
run's bookkeeping with a stand-in inspector in test_run_stream.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import texture
from eproj.cli import main


def _images(folder: Path, n: int, size: int = 32) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        image = (texture(rng, size) * 255).astype(np.uint8)
        if i % 3 == 1:
            image[8:16, 8:20] = 10
        cv2.imwrite(str(folder / f"part{i:03d}.png"), image)
        names.append(f"part{i:03d}.png")
    return names


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_with_a_broken_image(bundles, tmp_path, capsys):
    names = _images(tmp_path / "in", 4)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    assert main(["run", str(bundles["l2ae"][1]), "--backend", "onnxruntime", "--max-iters", "3",
                 "--source", str(tmp_path / "in"), "--out", str(out)]) == 0
    lines = _lines(out / "results.jsonl")
    assert [line["name"] for line in lines] == sorted(names + ["broken.png"])
    broken = next(line for line in lines if line["name"] == "broken.png")
    assert "not a readable image" in broken["error"]
    assert "skipped broken.png" in capsys.readouterr().err
    for line in lines:
        if "error" in line:
            continue
        assert set(line) >= {"score", "defect", "failed", "reason", "iterations", "latency_ms"}
        mask = cv2.imread(str(out / "masks" / f"{line['name']}.png"), cv2.IMREAD_GRAYSCALE)
        picture = cv2.imread(str(out / "overlays" / f"{line['name']}.jpg"))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        assert picture.shape == (32, 32, 3)


def test_video_file(bundles, tmp_path):
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    rng = np.random.default_rng(1)
    for _ in range(6):
        writer.write(cv2.cvtColor((texture(rng, 32) * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    writer.release()
    out = tmp_path / "out"
    assert main(["run", str(bundles["vae"][1]), "--backend", "onnxruntime", "--max-iters", "2",
                 "--source", str(path), "--out", str(out)]) == 0
    lines = _lines(out / "results.jsonl")
    assert [line["name"] for line in lines] == [f"line-{i:06d}" for i in range(6)]
    assert all("score" in line for line in lines)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_stopped_half_way_leaves_valid_files(bundles, tmp_path, how):
    _images(tmp_path / "in", 150)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "eproj.cli", "run", str(bundles["l2ae"][1]),
                                "--backend", "onnxruntime", "--max-iters", "100", "--stop-threshold", "-1",
                                "--source", str(tmp_path / "in"), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(process.pid, how)
    process.wait(timeout=30)
    lines = _lines(results)  # every line parses
    assert 3 <= len(lines) < 150
    for line in lines:
        assert cv2.imread(str(out / "masks" / f"{line['name']}.png")) is not None
        assert cv2.imread(str(out / "overlays" / f"{line['name']}.jpg")) is not None
    finished = [p for p in (out / "masks").iterdir() if not p.name.endswith(".tmp")]
    assert all(cv2.imread(str(p)) is not None for p in finished)
    if how == signal.SIGKILL:  # the same command resumes: every input once, none twice
        assert main(["run", str(bundles["l2ae"][1]), "--backend", "onnxruntime", "--max-iters", "1",
                     "--source", str(tmp_path / "in"), "--out", str(out)]) == 0
        names = [line["name"] for line in _lines(results)]
        assert sorted(names) == sorted(set(names)) and len(names) == 150


def test_bad_sources_and_show_without_a_gui(bundles, tmp_path, capsys):
    bundle = str(bundles["l2ae"][1])
    assert main(["run", bundle, "--backend", "onnxruntime", "--source", str(tmp_path / "nothing*"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "is no camera:N, video file, image folder or matching glob" in capsys.readouterr().err
    for camera in ("camera:x", "camera:-1"):
        assert main(["run", bundle, "--backend", "onnxruntime", "--source", camera, "--out", str(tmp_path)]) == 2
        assert "camera:N with N a camera index >= 0" in capsys.readouterr().err
    _images(tmp_path / "in", 1)
    try:
        cv2.namedWindow("probe")
        pytest.skip("this OpenCV has a GUI")
    except cv2.error:
        pass
    assert main(["run", bundle, "--backend", "onnxruntime", "--source", str(tmp_path / "in"),
                 "--out", str(tmp_path / "o"), "--show"]) == 2
    assert "--show needs OpenCV with GUI support" in capsys.readouterr().err


def test_bench_writes_latency_rows_beside_the_reference(bundles, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(bundles["dsae"][1]), "--backend", "onnxruntime", "--batch", "1,3", "--iters", "2",
                 "--repeats", "2", "--warmup", "1", "--json", str(out)]) == 0
    said = capsys.readouterr().err  # never silent: each step, and a bar per batch size
    for step in ("eproj bench: loading", "batch 1: 1 warm-up call(s)", "batch 3: the reference", "batch 3: p50"):
        assert step in said
    assert re.search(r"batch 1: +\d+%\|", said) and re.search(r"batch 3: +\d+%\|", said)  # the bars
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["p50_ms"] <= row["p99_ms"] and row["fps"] > 0 and row["iterations"] == 2
        assert set(row["stages_ms"]) == {"preprocess", "iterations", "dssim", "postprocess"}
        assert row["reference_eager_autograd"]["available"] and row["speedup_vs_reference"] > 0


def _run_args(bundle, tmp_path, *extra):
    return ["run", str(bundle), "--backend", "onnxruntime", "--max-iters", "1", "--source", str(tmp_path / "in"),
            "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("case,expected", [
    ("out is a file", "is a file; eproj run needs a folder there"),
    ("bundle is missing", "is not a bundle"),
    ("bundle is a file", "is not a bundle"),
    ("threads 1000", "argument --threads: at most"),
    ("threads after the subcommand 1000", "argument --threads: at most"),
    ("max-iters 1.5", "argument --max-iters: expected an integer >= 1"),
    ("lam nan", "argument --lam: expected a finite number"),
    ("alpha inf", "argument --alpha: expected a finite number"),
    ("alpha -1", "argument --alpha: expected a number > 0"),
    ("max-pixels 0", "argument --max-pixels: expected an integer >= 1"),
    ("tile-stride 0", "argument --tile-stride: expected an integer >= 1"),
    ("tile-stride 33", "tile_stride must be an integer in [1, 32] (the model size), got 33"),
    ("scale -2", "argument --scale: expected a number > 0"),
])
def test_bad_run_arguments_are_clear_errors(bundles, tmp_path, capsys, case, expected):
    _images(tmp_path / "in", 1)
    bundle = bundles["l2ae"][1]
    argv = _run_args(bundle, tmp_path)
    if case == "out is a file":
        (tmp_path / "out").write_text("")
    elif case == "bundle is missing":
        argv[1] = str(tmp_path / "no-bundle")
    elif case == "bundle is a file":
        (tmp_path / "file-bundle").write_text("")
        argv[1] = str(tmp_path / "file-bundle")
    elif case.startswith("threads after"):
        argv.insert(1, "--threads=1000")
    elif case.startswith("threads"):
        argv.insert(0, "--threads=1000")
    else:
        option, value = case.split()
        argv += [f"--{option}", value]
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_threads_stride_and_scale_reach_the_runtime(bundles, tmp_path, monkeypatch):
    _images(tmp_path / "in", 1)
    seen = {}
    import eproj.runtime.cli as run_cli

    real = run_cli.Inspector.from_bundle

    def spy(*args, **kwargs):
        seen.update({k: kwargs[k] for k in ("threads", "tile_stride", "scale")})
        return real(*args, **kwargs)

    monkeypatch.setattr(run_cli.Inspector, "from_bundle", spy)
    assert main(_run_args(bundles["l2ae"][1], tmp_path, "--threads", "1")) == 0
    assert seen["threads"] == 1
    assert main(["--threads", "2"] + _run_args(bundles["l2ae"][1], tmp_path, "--restart")) == 0
    assert seen == {"threads": 2, "tile_stride": None, "scale": None}  # unset: the runtime's defaults
    assert main(_run_args(bundles["l2ae"][1], tmp_path, "--restart", "--fit", "tile", "--tile-stride", "24",
                          "--scale", "1.5")) == 0
    assert (seen["tile_stride"], seen["scale"]) == (24, 1.5)
