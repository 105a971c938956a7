"""Model bundles: a folder of ONNX graphs and the ``manifest.json`` that describes them.

Shared by the export stage (which writes bundles) and the runtime (which reads
them); it needs the standard library only. The manifest names the family, the
input (size, channels, layout, value range), the Lr definition, the stop and
segmentation thresholds from training, the default projection parameters, the
opset, the eproj version and the SHA-256 of every file. ``load_manifest``
refuses a bundle whose schema version, hashes or shapes do not match, and says which.

What ``load_manifest`` guarantees before anything reads a bundle file:

- the manifest is a JSON object of at most ``MAX_MANIFEST_BYTES`` that fits the schema
  (``validate_manifest``): required keys, types, known family, graph and fit names, and
  every number finite (no NaN or Infinity anywhere, known field or not); a
  violation names the field, what it must be and what came;
- every file the manifest references (the graphs, ``weights``, ``ensemble``,
  ``torch_step``, ``torch_forward``, and the TensorRT ``engines``) is a relative path that stays inside
  the bundle folder: no absolute path, no ``..``, no symlink that leaves the folder;
- every referenced file but the engines is listed under ``files``, is a regular
  file, and has the size and SHA-256 listed there (the engines' own records carry
  their hashes, which ``eproj.engines.verify_engine`` checks when an engine is loaded).

What is hashed is what runs: a reader never reopens a bundle file by path after the
check. ``read_verified`` reads a file once and checks the size and SHA-256 of those very
bytes; the runtime builds its sessions, programs and engines from the bytes it returns
(``eproj.runtime.bundle.Bundle.graph_bytes`` and ``file_bytes``), so a file replaced on
disk after ``load_manifest`` is refused when it is read, never run.

TensorRT engines are built after export, on the target machine: ``record_engine``
adds each to the manifest's ``engines`` section, apart from ``files`` (which
``load_manifest`` verifies on every load); the runtime checks an engine's record when
it loads the engine (``eproj.engines.verify_engine``). Exporting again removes the
engines (``remove_engines``): they were built from the graphs being replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from eproj.config import ProjectionConfig
from eproj.errors import BundleError, ConfigError
from eproj.files import write_atomic

__all__ = ["BundleError", "load_manifest", "write_manifest", "validate_manifest", "referenced_files",
           "bundle_file", "read_verified", "record_engine", "remove_engines", "sha256"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # an exported manifest is a few kB
ENGINES = "engines"  # the manifest section of the TensorRT engines, written by `eproj build-engine`
ENGINE_SUFFIX = ".engine"
REQUIRED_KEYS = ("schema_version", "eproj_version", "family", "input", "lr_definition", "stop_threshold",
                 "segmentation", "projection", "opset", "files", "graphs")
# the model families (eproj.train.models.FAMILIES; repeated here, where torch is not imported)
FAMILIES = ("l2ae", "dsae", "vae", "gvae", "unet")
FITS = ("none", "resize", "tile")
REQUIRED_GRAPHS = ("encoder", "decoder", "step")
# the U-Net has no latent code between an encoder and a decoder: its bundle has the step graph(s) alone
FAMILY_GRAPHS = {"unet": ("step",)}
# optional: "forward" (x -> reconstruction, loss: the step without its gradient half) is run
# where no step follows; a bundle exported before it runs the step graph there instead
GRAPHS = REQUIRED_GRAPHS + ("step_fp16", "forward")
FILE_SECTIONS = ("weights", "ensemble", "torch_step", "torch_forward")  # optional sections naming one file each
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------

class _Fields:
    """Checks of one manifest's fields; every failure is a BundleError naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, got: Any) -> BundleError:
        shown = repr(got)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return BundleError(f"{self.where}: manifest field {field} must be {expected}, got {shown} "
                           f"({type(got).__name__})")

    def mapping(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "an object", value)
        return value

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, "a string", value)
        return value

    def one_of(self, value: Any, field: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(field, f"one of {choices}", value)
        return value

    def integer(self, value: Any, field: str, least: int, most: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None
                                                                                     and value > most):
            bound = f"in [{least}, {most}]" if most is not None else f">= {least}"
            raise self.fail(field, f"an integer {bound}", value)
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, "a finite number", value)
        return float(value)

    def numbers(self, value: Any, field: str) -> None:
        """An object of finite numbers (thresholds, statistics)."""
        for key, item in self.mapping(value, field).items():
            self.number(item, f"{field}.{key}")

    def shape(self, value: Any, field: str) -> None:
        if not isinstance(value, list) or not all(
                (isinstance(d, str) and d) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                for d in value):
            raise self.fail(field, "a list of dimensions (non-negative integers or names)", value)

    def finite_everywhere(self, value: Any, field: str) -> None:
        """No NaN or Infinity anywhere in ``value``, in known fields or not (JSON has no such numbers)."""
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(field, "a finite number (JSON has no NaN or Infinity)", value)
        if isinstance(value, dict):
            for key, item in value.items():
                self.finite_everywhere(item, f"{field}.{key}" if field else str(key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.finite_everywhere(item, f"{field}[{i}]")


def validate_manifest(manifest: Any, where: str = MANIFEST) -> dict[str, Any]:
    """Check ``manifest`` (a parsed manifest.json) against the schema; returns it unchanged.

    Raises BundleError naming the first field that is missing, of the wrong type, out of its
    range or not finite; ``where`` (the manifest's path) starts the message. Keys the schema
    does not know are allowed, but no number anywhere may be NaN or infinite.
    """
    check = _Fields(where)
    check.mapping(manifest, "(the whole manifest)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise BundleError(f"{where} has schema version {version!r}; this eproj reads version {SCHEMA_VERSION}. "
                          f"Export the bundle again with this eproj")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where} lacks the keys {missing}")
    check.finite_everywhere(manifest, "")
    check.text(manifest["eproj_version"], "eproj_version")
    check.one_of(manifest["family"], "family", FAMILIES)
    check.text(manifest["lr_definition"], "lr_definition")
    check.integer(manifest["opset"], "opset", 1)
    check.number(manifest["stop_threshold"], "stop_threshold")

    model = manifest.get("model")
    if model is not None:
        check.mapping(model, "model")
        if "family" in model and model["family"] != manifest["family"]:
            raise check.fail("model.family", f"the bundle's family {manifest['family']!r}", model["family"])

    given = check.mapping(manifest["input"], "input")
    for key in ("size", "channels"):
        if key not in given:
            raise BundleError(f"{where}: manifest field input.{key} is missing")
    check.integer(given["size"], "input.size", 1, 1 << 16)
    if given["channels"] not in (1, 3) or isinstance(given["channels"], bool):
        raise check.fail("input.channels", "1 or 3", given["channels"])
    if "fit" in given:
        check.one_of(given["fit"], "input.fit", FITS)
    if "value_range" in given:
        value_range = given["value_range"]
        if (not isinstance(value_range, list) or len(value_range) != 2
                or not check.number(value_range[0], "input.value_range[0]")
                < check.number(value_range[1], "input.value_range[1]")):
            raise check.fail("input.value_range", "[low, high] with low < high", value_range)
    for key in ("layout", "dtype", "channel_order", "normalisation"):
        if key in given:
            check.text(given[key], f"input.{key}")

    if "lr_stats" in manifest:
        check.numbers(manifest["lr_stats"], "lr_stats")
    for method, thresholds in check.mapping(manifest["segmentation"], "segmentation").items():
        check.numbers(thresholds, f"segmentation.{method}")
    projection = check.mapping(manifest["projection"], "projection")
    unknown = sorted(set(projection) - set(ProjectionConfig.__dataclass_fields__))
    if unknown:
        raise BundleError(f"{where}: manifest field projection has unknown parameter(s) {unknown}; "
                          f"valid: {sorted(ProjectionConfig.__dataclass_fields__)}")
    try:
        ProjectionConfig(**{**projection, "stop_threshold": manifest["stop_threshold"]})
    except ConfigError as exc:
        raise BundleError(f"{where}: manifest field projection: {exc}") from None

    files = check.mapping(manifest["files"], "files")
    for name, entry in files.items():
        check.mapping(entry, f"files[{name!r}]")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise check.fail(f"files[{name!r}].sha256", "64 lowercase hexadecimal digits", entry.get("sha256"))
        check.integer(entry.get("bytes"), f"files[{name!r}].bytes", 0)

    graphs = check.mapping(manifest["graphs"], "graphs")
    required = FAMILY_GRAPHS.get(manifest["family"], REQUIRED_GRAPHS)
    absent = [g for g in required if g not in graphs]
    if absent:
        raise BundleError(f"{where}: manifest field graphs lacks {absent} (every {manifest['family']} bundle has "
                          f"{list(required)})")
    for name, entry in graphs.items():
        check.one_of(name, f"graphs key {name!r}", GRAPHS)
        check.mapping(entry, f"graphs.{name}")
        check.text(entry.get("file"), f"graphs.{name}.file")
        for side in ("inputs", "outputs"):
            for tensor, shape in check.mapping(entry.get(side), f"graphs.{name}.{side}").items():
                check.shape(shape, f"graphs.{name}.{side}.{tensor}")
    for section in FILE_SECTIONS:
        if section in manifest:
            check.text(check.mapping(manifest[section], section).get("file"), f"{section}.file")
    if "ensemble" in manifest:
        threshold = check.number(manifest["ensemble"].get("threshold"), "ensemble.threshold")
        if not 0 < threshold < 1:
            raise check.fail("ensemble.threshold", "a probability in (0, 1)", threshold)
    for graph, record in check.mapping(manifest.get(ENGINES, {}), ENGINES).items():
        check.mapping(record, f"{ENGINES}.{graph}")
        check.text(record.get("file"), f"{ENGINES}.{graph}.file")
        for key in ("sha256", "graph", "graph_sha256"):
            check.text(record.get(key), f"{ENGINES}.{graph}.{key}")
    return manifest


def referenced_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file a (validated) manifest references but its engines: field -> file name."""
    named = {f"graphs.{graph}.file": entry["file"] for graph, entry in manifest["graphs"].items()}
    for section in FILE_SECTIONS:
        if section in manifest:
            named[f"{section}.file"] = manifest[section]["file"]
    return named


def bundle_file(folder: Path, name: Any, field: str) -> Path:
    """``folder / name`` after checking that ``name`` stays inside ``folder``.

    ``name`` must be a relative path of plain parts (no absolute path, no ``..``, no ``.``, no
    backslash or control character), and once symlinks are resolved it must still lie inside
    the folder. BundleError, naming ``field``, otherwise.
    """
    if not isinstance(name, str) or not name:
        raise BundleError(f"{folder}: manifest field {field} must be a file name, got {name!r}")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts)
            or any(ord(ch) < 32 for ch in name)):
        raise BundleError(f"{folder}: manifest field {field} is {name!r}; a bundle file must be a relative "
                          f"path inside the bundle folder (no absolute path, no '..')")
    path = folder / name
    root, resolved = folder.resolve(), path.resolve()
    if not resolved.is_relative_to(root):
        raise BundleError(f"{folder}: manifest field {field} is {name!r}, which resolves to {resolved}, "
                          f"outside the bundle folder {root} (a symlink leaving the bundle)")
    return path


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Hash every file the manifest references (``graphs``, ``weights``, ``ensemble``,
    ``torch_step``, ``torch_forward``), check the result against the schema and write ``manifest.json`` atomically.

    Raises BundleError, naming the field, where the manifest would not load (e.g. a NaN threshold).
    """
    named = sorted(set(manifest["graphs"][g]["file"] for g in manifest["graphs"]) |
                   {manifest[s]["file"] for s in FILE_SECTIONS if s in manifest})
    files = {}
    for name in named:
        path = bundle_file(folder, name, "files")
        files[name] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    payload = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    out = folder / MANIFEST
    validate_manifest(payload, str(out))
    write_atomic(out, json.dumps(payload, indent=2, allow_nan=False).encode())
    return out


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle: it is not a folder")
    if not path.is_file():
        raise BundleError(f"{folder} is not a bundle: {MANIFEST} is missing (or not a regular file)")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} has {size} bytes; a manifest has at most {MAX_MANIFEST_BYTES}")
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise BundleError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from exc


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and verify a bundle's manifest: the schema (``validate_manifest``), that every referenced
    file stays inside the folder and is listed under ``files``, and every listed file's size and hash.

    Returns the manifest; raises BundleError saying which check failed, naming the field or file.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = validate_manifest(_read_manifest(folder), str(path))
    files = manifest["files"]
    for field, name in referenced_files(manifest).items():
        bundle_file(folder, name, field)
        if name not in files:
            raise BundleError(f"{path}: manifest field {field} names {name!r}, which is not listed under "
                              f"files (every file the bundle reads is hashed there)")
    for graph, record in manifest.get(ENGINES, {}).items():
        bundle_file(folder, record["file"], f"{ENGINES}.{graph}.file")
    for name, entry in files.items():
        read_verified(folder, name, entry["bytes"], entry["sha256"], f"files[{name!r}]")
    _check_shapes(manifest, path)
    return manifest


def read_verified(folder: Path, name: str, size: int, digest: str, field: str,
                  changed: str = "modified after export") -> bytes:
    """The bytes of bundle file ``name`` (in ``folder``, named by manifest field ``field``), read
    once, after checking that they are ``size`` bytes with SHA-256 ``digest`` (64 hex digits).

    The check is on the bytes returned, so whatever uses them uses what was verified (a file
    swapped on disk between a check and a later open cannot slip in). The file is opened
    without blocking and must be a regular file: a FIFO or device under a bundle file's name is
    refused, never waited on. BundleError names the file and what differs; ``changed`` says the
    likely cause in the message.
    """
    file = bundle_file(folder, name, field)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BundleError(f"bundle file {file} is missing (or not a regular file)") from None
    except OSError as exc:
        raise BundleError(f"bundle file {file} cannot be read ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"bundle file {file} is missing (or not a regular file: a FIFO, device or folder "
                              "is never read)")
        if info.st_size != size:
            raise BundleError(f"bundle file {file} has {info.st_size} bytes; the manifest says {size} "
                              f"(truncated or replaced: {changed})")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(size + 1)  # one byte more: a file that grew after fstat is caught too
    except OSError as exc:
        raise BundleError(f"bundle file {file} cannot be read ({exc.strerror or exc})") from exc
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) != size:
        raise BundleError(f"bundle file {file} has {len(data)} bytes; the manifest says {size} "
                          f"(truncated or replaced: {changed})")
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise BundleError(f"bundle file {file} has SHA-256 {got[:16]}…; the manifest says {digest[:16]}… "
                          f"({changed})")
    return data


def _check_shapes(manifest: dict[str, Any], path: Path) -> None:
    """The graphs' image tensors must have the shape the manifest's ``input`` declares."""
    size, channels = manifest["input"]["size"], manifest["input"]["channels"]
    expected = ["N", channels, size, size]
    graphs = manifest["graphs"]
    declared = {"step input x": graphs["step"]["inputs"].get("x")}
    if "encoder" in graphs:  # every family's bundle but the U-Net's
        declared["encoder input x"] = graphs["encoder"]["inputs"].get("x")
    if "decoder" in graphs:
        declared["decoder output reconstruction"] = graphs["decoder"]["outputs"].get("reconstruction")
    if "step_fp16" in graphs:
        declared["step_fp16 input x"] = graphs["step_fp16"]["inputs"].get("x")
    if "forward" in graphs:
        declared["forward input x"] = graphs["forward"]["inputs"].get("x")
        declared["forward output reconstruction"] = graphs["forward"]["outputs"].get("reconstruction")
    for what, shape in declared.items():
        if shape != expected:
            raise BundleError(f"{path}: the {what} has shape {shape}; the manifest's input "
                              f"(size {size}, {channels} channel(s)) means {expected}")


def record_engine(folder: Path, graph: str, engine: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Record ``graph``'s engine file ``engine`` in ``folder``'s manifest; returns the record written.

    ``record`` says what the engine was built from and for (see ``eproj.engines``); the
    engine's SHA-256 and size are added here. The manifest is rewritten atomically.
    """
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    entry = {"file": engine.name, "sha256": sha256(engine), "bytes": engine.stat().st_size, **record}
    manifest.setdefault(ENGINES, {})[graph] = entry
    write_atomic(path, json.dumps(manifest, indent=2).encode())
    return entry


def remove_engines(folder: Path) -> list[Path]:
    """Delete the TensorRT engines in bundle ``folder`` (``*.engine``, and the ``*.engine.json``
    records of older eproj versions) before its graphs are exported again; returns what was removed.
    The new manifest has no ``engines`` section until ``eproj build-engine`` runs again."""
    stale = sorted(folder.glob("*" + ENGINE_SUFFIX)) + sorted(folder.glob("*" + ENGINE_SUFFIX + ".json"))
    for path in stale:
        path.unlink()
    return stale
