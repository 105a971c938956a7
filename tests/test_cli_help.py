"""The command line's help: every subcommand describes every option and shows its
default; the top-level description says what eproj does; --threads is taken
before or after the subcommand and bounded; numbers are checked where they enter."""

from __future__ import annotations

import argparse

import pytest

from eproj.cli import OPSETS, THREADS_PER_CORE, available_cores, build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers(build_parser()))


def test_the_top_level_says_what_eproj_does():
    text = build_parser().format_help()
    assert "finds defects" in text and "projects each inspected image" in text
    for name in SUBCOMMANDS:
        assert name in text


def _shown(default: object) -> str:
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_is_described_with_its_default(command):
    parser = _subparsers(build_parser())[command]
    assert parser.description, f"eproj {command} has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 3, f"eproj {command} {name} has no help"
        if not action.option_strings or action.required or isinstance(action, argparse._StoreTrueAction):
            continue
        if action.default is None or action.default is argparse.SUPPRESS:
            assert "[" in action.help, f"eproj {command} {name}: its help must say what happens when it is unset"
        else:
            assert f"[{_shown(action.default)}" in action.help, \
                f"eproj {command} {name}: its help must show the default {action.default!r}: {action.help!r}"


def test_run_help_says_a_rerun_resumes():
    text = _subparsers(build_parser())["run"].format_help()
    assert "resumes" in text and "--restart" in text


@pytest.mark.parametrize("argv,threads", [
    (["--threads", "2", "demo"], 2),
    (["demo", "--threads", "3"], 3),
    (["--threads", "1", "demo", "--threads", "2"], 2),  # the subcommand's wins
    (["demo"], None),
])
def test_threads_before_or_after_the_subcommand(argv, threads):
    assert build_parser().parse_args(argv).threads == threads


@pytest.mark.parametrize("argv,expected", [
    (["--threads", str(THREADS_PER_CORE * available_cores() + 1), "demo"], "at most"),
    (["demo", "--threads", "-1"], "expected an integer >= 0"),
    (["export", "run", "--out", "b", "--opset", str(OPSETS[-1] + 1)], "expected an ONNX opset from"),
    (["export", "run", "--out", "b", "--opset", "seventeen"], "expected an ONNX opset number"),
    (["eval", "run", "--json", "x", "--lam", "nan"], "expected a finite number"),
    (["eval", "run", "--json", "x", "--max-iters", "2.5"], "expected an integer >= 1"),
    (["train", "--data", "d", "--model", "l2ae", "--out", "o", "--lr", "inf"], "expected a finite number"),
    (["train", "--data", "d", "--model", "l2ae", "--out", "o", "--lr", "0"], "expected a number > 0"),
    (["bench", "b", "--json", "x", "--iters", "0"], "expected an integer >= 1"),
    (["sweep", "--data", "d", "--parameter", "beta", "--values", "1,nan", "--out", "o"], "finite numbers"),
])
def test_bad_numbers_are_refused_where_they_enter(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--tile-stride=8", "--scale=2", "--fit=tile", "--method=reconstruction"])
def test_bench_takes_no_frame_options_it_would_ignore(option, capsys):
    """eproj bench times model-size batches of the projection: options about frames are refused, not dropped."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "bundle", "--json", "out.json", option])
    assert "unrecognized arguments: " + option in capsys.readouterr().err
    build_parser().parse_args(["run", "bundle", "--source", "in", "--out", "out", option])
