import subprocess
import sys


def test_cli_and_runtime_import_without_torch():
    """The edge install has no torch: importing the CLI and the runtime must not pull it in."""
    code = ("import sys, eproj, eproj.cli, eproj.runtime, eproj.export; "
            "eproj.cli.build_parser(); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_nothing_imports_a_stage_by_its_bare_name():
    """Stages are eproj.train, eproj.export, eproj.runtime; never `import train` and the like.

    (An editable install of scikit-build-core puts the repository root on sys.path,
    so a bare import would work there and fail from a wheel: this test catches it.)
    """
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    bare = re.compile(r"^\s*(from|import)\s+(train|export|runtime)(\.|\s|$)", re.MULTILINE)
    offenders = [str(p.relative_to(root)) for folder in ("eproj", "train", "export", "runtime", "tests", "benchmarks")
                 for p in (root / folder).rglob("*.py") if bare.search(p.read_text())]
    assert offenders == []
    import eproj.train.models

    assert eproj.train.models.__name__ == "eproj.train.models"


# Who may import whom (every import statement counts, at module level or inside a
# function). The stages run train -> export -> runtime; cpp_ext sits beside them; the
# shared modules of eproj/ serve every stage; the face (the command line and the
# orchestration that spans stages) may import anything. Tests and benchmarks may too.
SHARED = {"eproj", "eproj.config", "eproj.errors", "eproj.files", "eproj.bundle", "eproj.tiles",
          "eproj.predictors", "eproj.engines", "eproj.decision", "eproj.piad_decision"}
FACE = {"eproj.cli", "eproj.demo", "eproj.report", "eproj.predictor_eval", "eproj.benchmarking"}
ALLOWED = {
    "shared": {"shared"},
    "cpp_ext": {"shared", "cpp_ext"},
    "train": {"shared", "cpp_ext", "train"},
    "export": {"shared", "cpp_ext", "train", "export"},
    "runtime": {"shared", "cpp_ext", "runtime"},
    "face": {"shared", "cpp_ext", "train", "export", "runtime", "face"},
}
FOLDERS = {"cpp_ext": "cpp_ext", "train": "train", "export": "export", "runtime": "runtime"}


def _part(module: str) -> str | None:
    """The part of eproj a module belongs to, or None for modules outside eproj."""
    parts = module.split(".")
    if parts[0] != "eproj":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    top = ".".join(parts[:2])
    if top in SHARED:
        return "shared"
    if top in FACE:
        return "face"
    if top == "eproj.models":
        return "shared"
    raise AssertionError(f"{module} is in no part of the stage map: add it to SHARED or FACE in this test")


def _modules():
    """(module name, source path) of every Python module of the package."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "eproj").rglob("*.py")):
        rel = path.relative_to(root / "eproj").with_suffix("")
        name = ".".join(("eproj", *rel.parts)).removesuffix(".__init__")
        yield name, path
    for package, folder in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            name = ".".join(("eproj", package, *rel.parts)).removesuffix(".__init__")
            yield name, path


def _imports(name: str, path) -> list[str]:
    import ast

    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in FACE]
    return found


def test_imports_follow_the_stage_directions():
    """The runtime never imports eproj.train or eproj.export; training never imports the
    runtime, export or the face; export never imports the runtime."""
    offenders = []
    modules = list(_modules())
    assert len(modules) > 40, [m for m, _ in modules]
    for name, path in modules:
        importer = _part(name)
        for imported in _imports(name, path):
            target = _part(imported)
            if target is not None and target not in ALLOWED[importer]:
                offenders.append(f"{name} ({importer}) imports {imported} ({target})")
    assert offenders == []


def test_the_stage_map_catches_a_crossing_import(tmp_path):
    """The checker itself: a runtime module importing the training code is an offence."""
    path = tmp_path / "fake.py"
    path.write_text("def f():\n    from eproj.train.checkpoint import load_model\n    from ..export import step\n")
    found = _imports("eproj.runtime.backends.fake", path)
    assert found == ["eproj.train.checkpoint", "eproj.runtime.export"]  # relative: ..export from runtime.backends
    assert _part("eproj.train.checkpoint") not in ALLOWED["runtime"]
    assert _part("eproj.demo") not in ALLOWED["train"] and _part("eproj.runtime.inspector") not in ALLOWED["export"]
