"""``eproj run`` against real write failures, in a subprocess with the shipped brick bundle
(no patched ``os.write``; tests/runtime/test_run_stream.py has those, for the branches):

- a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so a write past it is cut short and the
  next one fails with EFBIG): the disk-full path of results.jsonl for real;
- a full disk: a 128 KiB tmpfs the output lands on (ENOSPC), in a private mount namespace;
- a read-only file system: a tmpfs remounted read-only (EROFS), in a private mount namespace.
  Running as root, chmod would not stop a write; a read-only mount does.

Each run must stop with exit status 2 and a clear message, and leave results.jsonl with only
complete, valid JSON lines: every line written before the failure intact, no partial line.
The mount-namespace tests are skipped where ``unshare -m`` and ``mount`` are not permitted."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "eproj" / "models" / "brick-l2ae.pt"
RUN = "import sys; from eproj.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from eproj.export.onnx_graphs import export_bundle

    folder = tmp_path_factory.mktemp("real-disk") / "bundle"
    export_bundle(MODEL, folder)
    return folder


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """40 gray 128 x 128 textures (one tile of the brick model each)."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(40):
        noise = cv2.GaussianBlur(rng.normal(0, 1, (128, 128)).astype(np.float32), (0, 0), 2)
        image = np.clip(128 + 40 * noise / (noise.std() + 1e-6), 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), image)
    return folder


def _command(bundle: Path, frames: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", RUN, "run", str(bundle), "--source", str(frames), "--out", str(out),
            "--backend", "onnxruntime", "--threads", "1", "--max-iters", "3"]


def _valid_lines(path: Path) -> list[dict]:
    """Every line of ``path``, each complete (the file ends with a newline) and valid JSON."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends in a partial line: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.mark.parametrize("room", [0, 100, 1500])
def test_a_file_size_limit_stops_the_run_and_keeps_every_line(bundle, frames, tmp_path, room):
    """results.jsonl holds an earlier run's lines up to ``room`` bytes under the limit: 0, the
    next append fails (EFBIG); 100, it is cut short and must be undone; 1500, a few frames fit
    first. Images are far smaller than the limit, so results.jsonl is what hits it."""
    limit = 64 << 10
    out = tmp_path / "out"
    out.mkdir()
    earlier = []
    size = 0
    while True:
        line = json.dumps({"name": f"earlier/{len(earlier):04d}.png", "error": "recorded by an earlier run"}) + "\n"
        if size + len(line) > limit - room:
            break
        earlier.append(line)
        size += len(line)
    padding = limit - room - size  # the last earlier line padded to land exactly at limit - room
    earlier[-1] = earlier[-1][:-3] + " " * padding + earlier[-1][-3:]
    before = "".join(earlier).encode()
    assert len(before) == limit - room
    (out / "results.jsonl").write_bytes(before)

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(_command(bundle, frames, out), capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "cannot append to" in done.stderr and "results.jsonl" in done.stderr, done.stderr[-2000:]
    if room == 0:
        assert "File too large" in done.stderr, done.stderr[-2000:]
    elif room == 100:
        assert "bytes were written" in done.stderr, done.stderr[-2000:]
    after = (out / "results.jsonl").read_bytes()
    assert after.startswith(before)
    lines = _valid_lines(out / "results.jsonl")
    new = lines[len(earlier):]
    assert len(new) < 40 and all("score" in r and "defect" in r for r in new)
    assert len(after) <= limit
    if room == 1500:
        assert new, "a few lines fit under the limit before it was reached"
    # the rerun without the limit resumes: it inspects the rest, nothing twice
    done = subprocess.run(_command(bundle, frames, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    names = [r["name"] for r in _valid_lines(out / "results.jsonl")[len(earlier):]]
    assert sorted(names) == [f"{i:02d}.png" for i in range(40)]


def _namespace_mounts() -> str:
    """Empty when this process may mount a tmpfs in a private mount namespace, else why not."""
    if not (shutil.which("unshare") and shutil.which("mount")):
        return "needs unshare and mount (util-linux)"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt && mount -o remount,ro /mnt"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"cannot mount in a private mount namespace: {probe.stderr.strip()}"


NAMESPACE_SKIP = _namespace_mounts() if sys.platform == "linux" else "Linux mount namespaces only"


def _in_namespace(mountpoint: Path, setup: str, command: list[str]) -> subprocess.CompletedProcess:
    """Run ``setup`` (sh, with $M the mountpoint) then ``command`` in a private mount namespace."""
    mountpoint.mkdir()
    script = setup + ' && exec "$@"'
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *command],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "M": str(mountpoint)})


@pytest.mark.skipif(bool(NAMESPACE_SKIP), reason=NAMESPACE_SKIP or "")
def test_a_full_disk_stops_the_run_clearly_and_keeps_every_line(bundle, frames, tmp_path):
    """The output on a 128 KiB tmpfs: it fills after a few frames (masks, overlays, lines)."""
    disk, keep = tmp_path / "disk", tmp_path / "kept.jsonl"
    disk.mkdir()
    # the results are copied off the tmpfs before the namespace (and its mount) ends
    script = ('mount -t tmpfs -o size=128k tmpfs "$M" && '
              '{ "$@"; status=$?; cp "$M/out/results.jsonl" "$K"; exit $status; }')
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                           *_command(bundle, frames, disk / "out")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "M": str(disk), "K": str(keep)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "No space left on device" in done.stderr and "the run stops here" in done.stderr, done.stderr[-2000:]
    lines = _valid_lines(keep)
    assert 0 < len(lines) < 40 and all("score" in r for r in lines)
    assert not (disk / "out").exists()  # the tmpfs was private to the namespace


@pytest.mark.skipif(bool(NAMESPACE_SKIP), reason=NAMESPACE_SKIP or "")
@pytest.mark.parametrize("existing", [True, False])
def test_a_read_only_file_system_is_refused_before_any_frame(bundle, frames, tmp_path, existing):
    """--out on a read-only mount: an existing output folder (with its subfolders) is refused as
    not writable; a new one cannot be created. Both say so and exit 2, before any frame."""
    out = tmp_path / "ro" / ("out" if existing else "new")
    made = 'mkdir -p "$M/out/masks" "$M/out/overlays" && ' if existing else ""
    done = _in_namespace(tmp_path / "ro", f'mount -t tmpfs -o size=64k tmpfs "$M" && {made}'
                                          'mount -o remount,ro "$M" && ! touch "$M/probe" 2>/dev/null',
                         _command(bundle, frames, out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    says = "is not writable" if existing else "Read-only file system"
    assert says in done.stderr, done.stderr[-2000:]
    assert "inspected" not in done.stdout
