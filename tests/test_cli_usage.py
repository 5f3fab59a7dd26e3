"""Usage errors (a mistyped flag or command, a missing argument, a flag without its value) are one line on
stderr, exit 2, naming what was wrong; `--version` prints the version and exits 0."""

from __future__ import annotations

import pytest
from conftest import run_main

from peftlab import __version__


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, list[str]]:
    code, out, err = run_main(monkeypatch, capsys, *args)
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_version_prints_and_exits_0(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"peftlab {__version__}" and not err


@pytest.mark.parametrize(("args", "named"), [
    (["train", "tiny-gemma2-dolly", "--lrr", "3"], "--lrr"),  # mistyped flag
    (["train", "--overwrit"], "--overwrite"),  # the close valid flag is offered
    (["compare"], "runs"),  # missing argument
    (["train", "tiny-gemma2-dolly", "--name"], "--name"),  # flag without its value
    (["runs", "--runs-dir"], "--runs-dir"),
    (["train", "tiny-gemma2-dolly", "--gpus", "two"], "--gpus"),  # wrong type
    (["trian"], "trian"),  # mistyped command
])
def test_usage_errors_are_one_line_on_stderr_exit_2(monkeypatch, capsys, args, named):
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert not out.strip()
    assert len(err) == 1 and err[0].startswith("error: peftlab") and named in err[0] and "; fix: " in err[0], err
    assert "Traceback" not in err[0]


def test_recipe_errors_go_to_stderr(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "train", "no-such-recipe")
    assert code == 2 and not out.strip()
    assert len(err) == 1 and err[0].startswith("error: recipe 'no-such-recipe'")
