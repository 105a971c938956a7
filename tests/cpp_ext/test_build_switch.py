"""The CUDA kernels are a build switch, not a probe of the build machine (cpp_ext/CMakeLists.txt):
``EPROJ_CUDA=OFF``, the default, configures the C++ kernels alone even where nvcc is on the
PATH (this machine has one), and says so; ``ON`` without a CUDA compiler is an error that says
how to choose; any other value is refused. CMake configures cpp_ext/ only (no compiling)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _nanobind_dir() -> str:
    done = subprocess.run([sys.executable, "-m", "nanobind", "--cmake_dir"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


pytestmark = pytest.mark.skipif(not shutil.which("cmake") or not _nanobind_dir(),
                                reason="needs cmake and nanobind (pip install nanobind) to configure cpp_ext")


def _configure(tmp_path: Path, *defines: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = ["cmake", "-S", str(ROOT / "cpp_ext"), "-B", str(tmp_path / "build"),
               f"-DPython_EXECUTABLE={sys.executable}", *defines]
    if shutil.which("ninja"):
        command += ["-G", "Ninja"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_the_default_build_is_cpp_only_and_says_so(tmp_path):
    done = _configure(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "eproj kernels: C++ only" in done.stdout and "EPROJ_CUDA=ON builds them" in done.stdout
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "EPROJ_CUDA:STRING=OFF" in cache
    assert "CMAKE_CUDA_COMPILER:" not in cache  # no CUDA probe at all, nvcc on the PATH or not


def test_cuda_on_without_a_compiler_says_how_to_choose(tmp_path):
    done = _configure(tmp_path, "-DEPROJ_CUDA=ON", env={"CUDACXX": str(tmp_path / "no-nvcc"),
                                                         "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "EPROJ_CUDA=ON but no CUDA compiler was found" in done.stderr
    assert "EPROJ_CUDA=OFF (the default)" in done.stderr


@pytest.mark.parametrize("value", ["AUTO", "yes-please"])
def test_other_values_are_refused(tmp_path, value):
    done = _configure(tmp_path, f"-DEPROJ_CUDA={value}")
    assert done.returncode != 0
    assert f"EPROJ_CUDA must be ON or OFF, got '{value.upper()}'" in done.stderr
