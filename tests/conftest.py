"""Shared fixtures: a private preset cache per session and a fast tiny-twin recipe factory."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peftlab.config import Recipe, load_recipe, with_overrides
from peftlab.runs import RunDir

# Small enough that a full train + eval + samples takes a few seconds on 2 CPU cores.
FAST = {
    "data.max_samples": 48,
    "data.eval_fraction": 0.1,
    "train.max_steps": 6,
    "train.logging_steps": 2,
    "train.batch_size": 2,
    "train.grad_accum": 1,
    "eval.prompts": ["Name a primary color."],
    "eval.max_new_tokens": 4,
}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PEFTLAB_CACHE"] = str(tmp_path_factory.mktemp("peftlab-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_recipe() -> Callable[..., Recipe]:
    """tiny-gemma2-dolly shrunk for tests; pass dotted overrides, e.g. tiny_recipe({"method.name": "qlora"})."""

    def make(changes: dict[str, Any] | None = None) -> Recipe:
        return with_overrides(load_recipe("tiny-gemma2-dolly"), {**FAST, **(changes or {})})

    return make


@pytest.fixture
def tiny_classifier() -> Callable[..., Recipe]:
    """tiny-dialogpt-banking77 (5 real Banking77 intents) shrunk to a few seconds; dotted overrides as above."""

    def make(changes: dict[str, Any] | None = None) -> Recipe:
        fast = {"train.max_steps": 8, "train.eval_steps": 4, "train.save_steps": 4, "train.logging_steps": 2,
                "data.max_samples": 160}
        return with_overrides(load_recipe("tiny-dialogpt-banking77"), {**fast, **(changes or {})})

    return make


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def make_run(runs_dir: Path) -> Callable[..., RunDir]:
    """A run folder written by hand, no training: make_run("a", {"runtime_s": 10.0}, metrics=[{...}, ...])."""

    def make(name: str, summary: dict[str, Any], metrics: list[dict[str, Any]] = ()) -> RunDir:
        run = RunDir.create(runs_dir, name, load_recipe("tiny-gemma2-dolly"))
        defaults = {"name": run.name, "task": "sft", "recipe": "tiny-gemma2-dolly", "method": "lora", "status": "completed"}
        run.update_summary(**{**defaults, **summary})
        for record in metrics:
            run.append_metrics(record)
        return run

    return make


@pytest.fixture
def fast_sets() -> list[str]:
    """FAST as CLI arguments: ["--set", "data.max_samples=48", ...]."""
    return [arg for key, value in FAST.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `peftlab ARGS` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from peftlab.cli import main

    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, list[str]]]:
    """`peftlab ARGS` in-process (see run_main); returns (exit code, non-empty output lines, stdout then stderr)."""

    def invoke(*args: str) -> tuple[int, list[str]]:
        code, out, err = run_main(monkeypatch, capsys, *args)
        return code, [line for line in (out + err).splitlines() if line.strip()]

    return invoke


@pytest.fixture
def cli_out(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, list[str]]]:
    """As `cli`, but only stdout's non-empty lines: a verb's results, without the progress lines (stderr)."""

    def invoke(*args: str) -> tuple[int, list[str]]:
        code, out, _ = run_main(monkeypatch, capsys, *args)
        return code, [line for line in out.splitlines() if line.strip()]

    return invoke
