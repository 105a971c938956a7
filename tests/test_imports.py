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
