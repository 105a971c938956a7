"""Type stubs of the real TensorRT Python API, one set per TensorRT version, for mypy.

TensorRT cannot be installed without an NVIDIA GPU setup, but its Python bindings
wheels (``tensorrt-cu12-bindings``, ``tensorrt-cu13-bindings``) download anywhere.
Their compiled module links to libnvinfer, libnvinfer_plugin and libnvonnxparser;
given stand-ins for those (``standin.c``: the few C symbols it imports, under the
sonames it asks for), it imports, and ``pybind11-stubgen`` writes ``.pyi`` stubs from
it. Three steps per version, cached under ``build/tensorrt-stubs/<version>/``:

1. ``pip download --no-deps`` the bindings wheel and unpack it;
2. compile the stand-ins with gcc, one per library the module needs (``readelf -d``);
3. run pybind11-stubgen, name the C++ types it could not map by their Python names
   (``nvonnxparser::IParserError`` -> ``ParserError``), and add a ``tensorrt``
   package that re-exports ``tensorrt_bindings``, as ``import tensorrt`` does.

``python tests/tensorrt_stubs/build.py 11`` builds one set and prints its folder.
"""

from __future__ import annotations

import ast
import hashlib
import keyword
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / "build" / "tensorrt-stubs"
# TensorRT major version -> the bindings wheel: 10.3 is JetPack 6's TensorRT, 11.x the desktop's
VERSIONS = {"10": ("tensorrt-cu12-bindings", "10.3.0"), "11": ("tensorrt-cu13-bindings", "11.4.0.106")}
# the libraries the bindings link to, by soname prefix -> the stand-in's -D switch
STANDINS = {"libnvinfer.so.": "EPROJ_NVINFER", "libnvinfer_plugin.so.": "EPROJ_NVINFER_PLUGIN",
            "libnvonnxparser.so.": "EPROJ_NVONNXPARSER"}
# enums whose default values pybind11-stubgen cannot place without help
ENUM_LOCATIONS = ["Severity:tensorrt_bindings.tensorrt.ILogger"] + [
    f"{name}:tensorrt_bindings.tensorrt"
    for name in ("DataType", "ExecutionContextAllocationStrategy", "PluginFieldType", "EngineStat")]


# classes the bindings give Python's buffer protocol (each one's docstring says so); pybind11-stubgen
# cannot see it, so their stubs get the __buffer__ that `bytes(engine)` and `memoryview` need
BUFFER_CLASSES = ("IHostMemory",)


class StubsUnavailable(Exception):
    """The bindings wheel could not be downloaded (no registry reachable): the check cannot run here."""


def _run(command: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise RuntimeError(f"{what} needs `{command[0]}`, which is not on PATH") from None
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command)}):\n{result.stdout}{result.stderr}")
    return result


def _fingerprint(distribution: str, version: str) -> str:
    """Changes when the wheel asked for, pybind11-stubgen or this builder changes: the cache is then rebuilt."""
    try:
        stubgen = metadata.version("pybind11-stubgen")
    except metadata.PackageNotFoundError:
        raise RuntimeError("pybind11-stubgen is not installed: it comes with eproj[test]") from None
    digest = hashlib.sha256(f"{distribution}=={version} pybind11-stubgen=={stubgen}".encode())
    for source in (HERE / "build.py", HERE / "standin.c"):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def download(distribution: str, version: str, folder: Path) -> Path:
    """The bindings wheel, downloaded into ``folder`` (StubsUnavailable if no registry answers)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                             "--timeout", "30", "--retries", "1", "-d", str(folder), f"{distribution}=={version}"],
                            capture_output=True, text=True)
    wheels = sorted(folder.glob(f"{distribution.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StubsUnavailable(f"`pip download --no-deps {distribution}=={version}` failed: {last}")
    return wheels[-1]


def needed_libraries(module: Path) -> list[str]:
    """The sonames of the TensorRT libraries ``module`` links to (its DT_NEEDED entries)."""
    dynamic = _run(["readelf", "-d", str(module)], "readelf").stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    tensorrt = [name for name in needed if name.startswith(("libnvinfer", "libnvonnxparser"))]
    unknown = [name for name in tensorrt if not any(name.startswith(prefix) for prefix in STANDINS)]
    if unknown or not tensorrt:
        raise RuntimeError(f"{module} links to {tensorrt}; stand-ins exist for {sorted(STANDINS)}")
    return tensorrt


def compile_standins(sonames: list[str], folder: Path) -> None:
    """One stand-in shared library per soname, from standin.c."""
    folder.mkdir(parents=True, exist_ok=True)
    for soname in sonames:
        switch = next(define for prefix, define in STANDINS.items() if soname.startswith(prefix))
        _run(["gcc", "-shared", "-fPIC", "-O1", f"-D{switch}", f"-Wl,-soname,{soname}", "-o", str(folder / soname),
              str(HERE / "standin.c")], f"compiling the {soname} stand-in")


def python_names(stub: str) -> str:
    """``stub`` with the C++ type names pybind11-stubgen printed as is replaced by the module's
    Python classes (``nvinfer1::v_1_0::IGpuAllocator`` -> ``IGpuAllocator``,
    ``nvonnxparser::IParserError`` -> ``ParserError``), or by ``typing.Any`` where it has none,
    and parameters named by a Python keyword renamed (``in`` -> ``in_``)."""
    classes = set(re.findall(r"^class (\w+)", stub, re.MULTILINE))

    def python(match: re.Match[str]) -> str:
        name = match.group(1)
        for candidate in (name, name[1:] if name.startswith("I") else name):
            if candidate in classes:
                return candidate
        return "typing.Any"

    keywords = "|".join(keyword.kwlist)
    stub = re.sub(rf"([(,] *)({keywords})(: )", r"\1\2_\3", stub)  # parameters named `in`
    stub = re.sub(r"detail::accessor<[^>]*>", "typing.Any", stub)
    stub = re.sub(r"\b(?:nvinfer1|nvonnxparser)::(?:\w+::)*(\w+)", python, stub)
    stub = re.sub(r"(?<![\w.`])capsule\b(?!`)", "typing_extensions.CapsuleType", stub)
    return re.sub(r"^( *def \w+\()(.*)(\) -> .*:)$", _defaults_in_order, stub, flags=re.MULTILINE)


def buffer_protocol(stub: str) -> str:
    """``stub`` (the bindings' ``tensorrt.pyi``) with ``__buffer__`` for ``BUFFER_CLASSES``."""
    for name in BUFFER_CLASSES:
        docstring = re.compile(rf'^(class {name}:\n    """.*?""")\n', re.MULTILINE | re.DOTALL)
        found = docstring.search(stub)
        if found is None or "buffer protocol" not in found.group(1):
            raise RuntimeError(f"the bindings' {name} no longer documents Python's buffer protocol")
        stub = docstring.sub(r"\1\n    def __buffer__(self, flags: int, /) -> memoryview: ...\n", stub, count=1)
    return stub


def _defaults_in_order(match: re.Match[str]) -> str:
    """A signature whose required parameters follow defaulted ones (pybind11 allows it,
    Python does not) with ``= ...`` given to those: ``(a: int = 0, b: int)`` -> ``(a: int = 0, b: int = ...)``."""
    parameters, depth, start = [], 0, 0
    text = match.group(2)
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parameters.append(text[start:i])
            start = i + 1
    parameters.append(text[start:])
    defaulted = False
    for i, parameter in enumerate(parameters):
        if "=" in parameter:
            defaulted = True
        elif defaulted and parameter.strip() and not parameter.strip().startswith("*"):
            parameters[i] = parameter + " = ..."
    return match.group(1) + ",".join(parameters) + match.group(3)


def generate(module_root: Path, libraries: Path, out: Path) -> None:
    """Run pybind11-stubgen on ``tensorrt_bindings`` under the stand-ins and write ``out``."""
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libraries),
                                                                        os.environ.get("LD_LIBRARY_PATH")])),
           "PYTHONPATH": str(module_root)}
    command = [sys.executable, "-m", "pybind11_stubgen", "tensorrt_bindings", "-o", str(out),
               "--print-invalid-expressions-as-is"]
    for location in ENUM_LOCATIONS:
        command += ["--enum-class-locations", location]
    _run(command, "pybind11-stubgen", env=env, cwd=module_root)
    for stub in sorted((out / "tensorrt_bindings").rglob("*.pyi")):
        text = python_names(stub.read_text())
        if stub.name == "tensorrt.pyi":
            text = buffer_protocol(text)
        try:
            ast.parse(text)
        except SyntaxError as error:
            raise RuntimeError(f"the generated stub {stub} is not valid Python after naming its C++ types: "
                               f"line {error.lineno}: {error.text!r}") from error
        stub.write_text(text)
    package = out / "tensorrt"
    package.mkdir()
    (package / "__init__.pyi").write_text("# `import tensorrt` gives the bindings' names and version\n"
                                          "from tensorrt_bindings import *\n"
                                          "from tensorrt_bindings import __version__ as __version__\n")


def build(major: str) -> Path:
    """The stubs folder (for MYPYPATH) of TensorRT ``major`` ("10" or "11"), built unless cached."""
    distribution, version = VERSIONS[major]
    folder = CACHE / version
    stamp, stubs = folder / "stamp", folder / "stubs"
    fingerprint = _fingerprint(distribution, version)
    if stamp.is_file() and stamp.read_text() == fingerprint and (stubs / "tensorrt" / "__init__.pyi").is_file():
        return stubs
    wheels = folder / "wheel"
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    wheel = found[-1] if found else download(distribution, version, wheels)
    module_root = folder / "module"
    if module_root.exists():
        shutil.rmtree(module_root)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(module_root)
    module = module_root / "tensorrt_bindings" / "tensorrt.so"
    compile_standins(needed_libraries(module), folder / "lib")
    generate(module_root, folder / "lib", stubs)
    stamp.write_text(fingerprint)
    return stubs


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "11"))
