import subprocess
import sys


def test_cli_and_runtime_import_without_torch():
    """The edge install has no torch: importing the CLI and the runtime must not pull it in."""
    code = ("import sys, eproj, eproj.cli, eproj.runtime, eproj.export; "
            "eproj.cli.build_parser(); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_stage_packages_are_namespaced():
    import eproj.train.models

    assert eproj.train.models.__name__ == "eproj.train.models"
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('train') is None else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0
