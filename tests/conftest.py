"""Shared fixtures: a private preset cache per session and a fast tiny-twin recipe factory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peftlab.config import Recipe, load_recipe, with_overrides

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
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"
