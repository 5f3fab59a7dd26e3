"""What a task is: the one declaration every command reads (`Task`), and what its training returns.

A task is two modules: a light declaration (`<name>_task.py`: fields, metrics, views, objectives, and the
methods the commands call) and its implementation (`<name>.py`: data, model, evaluation, samples), which the
declaration imports only inside its methods. `peftlab runs` and `compare` read the declarations of every
task and must not pay for importing torch, transformers and diffusers (about 7 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from peftlab.watch.monitor import BatchCounter

if TYPE_CHECKING:
    from pathlib import Path

    from peftlab.config import Recipe
    from peftlab.engines import EngineResult, LossKind, TrainJob
    from peftlab.runs import RunDir
    from peftlab.watch.guard import RunContext

# Blocks of the report's samples section (rendered by report/html.py from the files a task's runs write).
SampleBlock = Literal["generations", "confusion_matrix", "images"]


@dataclass(frozen=True)
class TaskView:
    """How `compare`, `runs` and the report show a task's runs (names are summary.json keys)."""

    columns: tuple[str, ...]  # shown for runs of this task even when n/a
    key_metrics: tuple[tuple[str, ...], ...]  # groups of alternatives: the first present of each group
    rate: tuple[str, ...]  # the throughput named in the one-line verdict, first present wins


DEFAULT_VIEW = TaskView((), (("eval_loss", "final_train_loss"),), ("tokens_per_s", "samples_per_s", "it_per_s"))


@dataclass
class Prepared:
    """A task's model and data, ready for an engine: what `Task.prepare` returns to the training skeleton."""

    recipe: Recipe
    job: TrainJob  # what the engine receives
    setup: Any  # the task's own setup (model, tokenizer, data, ...), handed back to its save/finish methods
    context: RunContext  # model family, precision, attention: what the health guard names causes from
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json fields known before training
    counter_class: type = BatchCounter  # what a micro-batch counts (tokens; images for diffusion)
    counter: Any = None  # the run's counter, set by the skeleton (restored from the checkpoint on resume)


@dataclass
class Exported:
    """What a task's `export` wrote into the folder it was given: the facts the model card needs."""

    library: str  # transformers | diffusers
    pipeline_tag: str  # text-generation | text-classification | text-to-image
    load: str  # a Python line that loads the folder
    notes: list[str] = field(default_factory=list)


class Task:
    """One task: subclass, fill the class attributes, name the implementation module, then `register_task(name, cls)`.

    Every command dispatches through this interface; no other module branches on a task name. The training and
    export methods delegate to the implementation module's functions of the same name (`prepare(recipe, run)`,
    `save`, `finish`, `doctor`, `export`), imported only when called; `generate` is the task's own.
    """

    name: str  # set by register_task
    columns: ClassVar[tuple[str, ...]]  # our data field names; data.columns maps them to the user's columns
    loss_kind: ClassVar[LossKind]
    objectives: ClassVar[tuple[str, ...]]  # summary keys a sweep may optimise; the first is the default
    view: ClassVar[TaskView] = DEFAULT_VIEW
    samples: ClassVar[tuple[SampleBlock, ...]] = ()  # the report blocks its runs fill

    def implementation(self) -> ModuleType:
        """The module that does the work (tasks/<name>.py), imported here so that `runs` and `compare` never pay
        for torch, transformers and diffusers."""
        raise NotImplementedError

    # ---- training: the skeleton (peftlab/training.py) calls these in order
    def prepare(self, recipe: Recipe, run: RunDir) -> Prepared:
        """Build data and adapted model, print what will train; the job carries loss kind and datasets."""
        return self.implementation().prepare(recipe, run)

    def save(self, run: RunDir, prepared: Prepared) -> None:
        """Write adapter/ (also after an interrupt: what was learnt so far stays usable)."""
        self.implementation().save(run, prepared)

    def finish(self, run: RunDir, prepared: Prepared, result: EngineResult) -> dict[str, Any]:
        """After training and `save`: evaluation metrics and samples; returns summary fields."""
        return self.implementation().finish(run, prepared, result)

    # ---- the other commands
    def trial_overrides(self, recipe: Recipe) -> dict[str, Any]:
        """Recipe changes for a sweep trial (e.g. hide the test set); none by default."""
        return {}

    def doctor(self, recipe: Recipe) -> list[str]:
        """`peftlab doctor`: print the checkup, return the problems (empty = healthy)."""
        return self.implementation().doctor(recipe)

    def generate(self, run: RunDir, recipe: Recipe, prompts: list[str], max_new_tokens: int | None = None,
                 seeds: list[int] | None = None, steps: int | None = None) -> list[str]:
        """`peftlab generate`: use the run's adapter on `prompts`; returns the lines to print."""
        raise NotImplementedError

    def export(self, run: RunDir, recipe: Recipe, folder: Path) -> Exported:
        """`peftlab export`: the run's adapter merged into the base it was trained on, written to `folder` as a model
        its library loads (safetensors); returns what the model card says of it."""
        return self.implementation().export(run, recipe, folder)

