"""`peftlab matrix`: the same recipe under several methods, then the comparison table."""

from __future__ import annotations

from pathlib import Path

from peftlab.config import Recipe, with_overrides
from peftlab.errors import PeftlabError
from peftlab.runner import run_recipe
from peftlab.runs import RunDir
from peftlab.watch.progress import Countdown

METHODS = ("lora", "qlora")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise PeftlabError(f"--methods '{text}': unknown method {bad or '(none)'}; fix: use {','.join(METHODS)} or one of them")
    return methods


def run_matrix(recipe: Recipe, methods: list[str], runs_dir: Path, prefix: str, overwrite: bool = False,
               show_progress: bool = True) -> list[RunDir]:
    """Identical settings, one run per method, named PREFIX-METHOD; a `[run n/N]` line with the overall ETA before each."""
    runs = []
    countdown = Countdown("run", len(methods))
    for method in methods:
        variant = with_overrides(recipe, {"method.name": method})
        countdown.next(f"{prefix}-{method}")
        runs.append(run_recipe(variant, runs_dir, f"{prefix}-{method}", overwrite=overwrite, show_progress=show_progress))
    countdown.finish()
    return runs
