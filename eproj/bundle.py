"""Model bundles: a folder of ONNX graphs and the ``manifest.json`` that describes them.

Shared by the export stage (which writes bundles) and the runtime (which reads
them); it needs the standard library only. The manifest names the family, the
input (size, channels, layout, value range), the Lr definition, the stop and
segmentation thresholds from training, the default projection parameters, the
opset, the eproj version and the SHA-256 of every file. ``load_manifest``
refuses a bundle whose schema version, hashes or shapes do not match, and says which.

TensorRT engines are built after export, on the target machine: ``record_engine``
adds each to the manifest's ``engines`` section, apart from ``files`` (which
``load_manifest`` verifies on every load); the runtime checks an engine's record when
it loads the engine (``eproj.engines.verify_engine``). Exporting again removes the
engines (``remove_engines``): they were built from the graphs being replaced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from eproj.errors import EprojError
from eproj.files import write_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENGINES = "engines"  # the manifest section of the TensorRT engines, written by `eproj build-engine`
ENGINE_SUFFIX = ".engine"
REQUIRED_KEYS = ("schema_version", "eproj_version", "family", "input", "lr_definition", "stop_threshold",
                 "segmentation", "projection", "opset", "files", "graphs")


class BundleError(EprojError):
    """A bundle is missing, tampered with, or of another schema version."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Hash every file named in ``manifest["graphs"]`` (and ``weights``, ``ensemble``, ``torch_step``) and write ``manifest.json`` atomically."""
    files = {}
    named = {g["file"] for g in manifest["graphs"].values()}
    for extra in ("weights", "ensemble", "torch_step"):
        if extra in manifest:
            named.add(manifest[extra]["file"])
    for name in sorted(named):
        path = folder / name
        files[name] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    payload = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    out = folder / MANIFEST
    write_atomic(out, json.dumps(payload, indent=2).encode())
    return out


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and verify a bundle's manifest: schema version, keys, and every file's hash and size."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not a bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path} has schema version {version!r}; this eproj reads version {SCHEMA_VERSION}. "
                          f"Export the bundle again with this eproj")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks the keys {missing}")
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"bundle file {file} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"bundle file {file} has {size} bytes; the manifest says {entry['bytes']} "
                              f"(truncated or replaced)")
        digest = sha256(file)
        if digest != entry["sha256"]:
            raise BundleError(f"bundle file {file} has SHA-256 {digest[:16]}…; the manifest says "
                              f"{entry['sha256'][:16]}… (modified after export)")
    _check_shapes(manifest, path)
    return manifest


def _check_shapes(manifest: dict[str, Any], path: Path) -> None:
    """The graphs' image tensors must have the shape the manifest's ``input`` declares."""
    size, channels = manifest["input"]["size"], manifest["input"]["channels"]
    expected = ["N", channels, size, size]
    graphs = manifest["graphs"]
    declared = {"step input x": graphs.get("step", {}).get("inputs", {}).get("x"),
                "encoder input x": graphs.get("encoder", {}).get("inputs", {}).get("x"),
                "decoder output reconstruction": graphs.get("decoder", {}).get("outputs", {}).get("reconstruction")}
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
