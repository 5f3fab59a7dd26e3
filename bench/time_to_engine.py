"""Seconds from a `peftlab train` launch to the engine's first call, by phase (CPU or GPU; not a test).

    python bench/time_to_engine.py gemma2-dolly --set model.source=preset:tiny-gemma2 [--json out.json]

Runs `peftlab train RECIPE ARGS` in this process and stops it where the engine would start training
(`Engine.train`), so nothing after that point (compile, steps, evaluation) is timed. Phases are read from the
progress phases' start lines and from wrappers around the skeleton's steps; the clock starts at the process's
creation (/proc, as `time` would see it), so interpreter start-up and imports are included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import psutil

START = psutil.Process().create_time()
STAMPS: list[tuple[str, float]] = [("python started, bench imports done", time.time() - START)]


class EngineReached(Exception):
    pass


def stamp(label: str) -> None:
    STAMPS.append((label, time.time() - START))


def wrap(module: object, name: str, label: str) -> None:
    original = getattr(module, name)

    def timed(*args: object, **kwargs: object) -> object:
        stamp(f"{label}: start")
        try:
            return original(*args, **kwargs)
        finally:
            stamp(f"{label}: end")

    setattr(module, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    args, train_args = parser.parse_known_args()
    import peftlab.cli as cli

    stamp("peftlab.cli imported")
    import peftlab.tasks.sft as sft
    import peftlab.training as training
    from peftlab.models import adapt, loader

    stamp("task modules imported")
    wrap(loader, "load_tokenizer", "tokenizer")
    wrap(sft, "build_sft_data", "data")
    wrap(sft, "_load_adapted_model", "model + LoRA")
    wrap(adapt, "apply_lora", "LoRA")
    wrap(training, "resolve_engine", "engine choice")

    def reached(*_args: object, **_kwargs: object) -> dict:
        stamp("engine.train called")
        raise EngineReached

    training._train_and_finish = reached
    sys.argv = ["peftlab", "train", *train_args]
    with contextlib.suppress(EngineReached, SystemExit):  # the run stops where the engine would start
        cli.main()
    for label, t in STAMPS:
        print(f"{t:8.2f} s  {label}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"argv": train_args, "stamps": STAMPS}, indent=1))


if __name__ == "__main__":
    main()
