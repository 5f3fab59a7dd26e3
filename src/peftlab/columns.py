"""The numbers of a run's summary.json as every view shows them: the known columns (title, format, how
they compare), missing/NaN as n/a, and the key metrics a task declares (tasks/: `Task.view`).

Read by `compare`, the report, `runs` and `watch`, so it sits below all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from peftlab.tasks import TaskView, get_task, task_names
from peftlab.tasks.base import DEFAULT_VIEW

NA = "n/a"
Kind = Literal["time", "memory", "rate", "metric", "count"]


@dataclass(frozen=True)
class Column:
    name: str  # the row key (and the summary key unless `keys` says otherwise)
    title: str
    fmt: str
    kind: Kind  # time -> speedup, memory -> % change, rate -> ratio, metric -> delta, count -> none
    lower_is_better: bool = False
    keys: tuple[str, ...] = ()  # summary keys to read, first present wins; default (name,)

    def read(self, summary: dict[str, Any]) -> float | None:
        for key in self.keys or (self.name,):
            value = number(summary.get(key))
            if value is not None:
                return value
        return None


COLUMNS = (
    Column("runtime_s", "train time s", ".1f", "time", lower_is_better=True),
    # CUDA allocator peak on a GPU, resident-set peak on a CPU (see watch/memory.py).
    Column("peak_mem_gib", "peak mem GiB", ".2f", "memory", True, ("peak_mem_allocated_gib", "peak_mem_rss_gib")),
    Column("peak_mem_reserved_gib", "peak reserved GiB", ".2f", "memory", lower_is_better=True),
    Column("steps_per_s", "steps/s", ".3f", "rate"),
    Column("it_per_s", "it/s", ".3f", "rate"),
    Column("samples_per_s", "samples/s", ".2f", "rate"),
    Column("tokens_per_s", "tokens/s", ".0f", "rate"),
    Column("padded_tokens_per_s", "padded tok/s", ".0f", "rate"),
    Column("steps", "steps", "d", "count"),
    Column("epochs", "epochs", ".2f", "count"),
    Column("final_train_loss", "final loss", ".4f", "metric", lower_is_better=True),
    Column("eval_loss", "eval loss", ".4f", "metric", lower_is_better=True),
    Column("perplexity", "perplexity", ".2f", "metric", lower_is_better=True),
    Column("eval_accuracy", "eval acc", ".4f", "metric"),
    Column("eval_f1", "eval F1", ".4f", "metric"),
    Column("test_accuracy", "test acc", ".4f", "metric"),
    Column("test_f1", "test F1", ".4f", "metric"),
)
BY_NAME = {c.name: c for c in COLUMNS}
ALWAYS = ("runtime_s", "peak_mem_gib", "steps", "final_train_loss")


def view(task: str | None) -> TaskView:
    """The columns and key metrics the run's task declares (tasks/), a generic view for an unknown task."""
    return get_task(task).view if task in task_names() else DEFAULT_VIEW


def number(value: Any) -> float | None:
    """A finite number, or None for missing/NaN/inf/strings (how json_safe stores non-finite values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None  # ints stay ints (steps in a CSV read "60", not "60.0")


def key_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The task's headline numbers present in a summary, e.g. {"eval_loss": 1.23} for SFT."""
    found = {}
    for group in view(summary.get("task")).key_metrics:
        for name in group:
            value = BY_NAME[name].read(summary)
            if value is not None:
                found[name] = value
                break
    return found


def key_metric_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{BY_NAME[k].title} {cell(v, BY_NAME[k].fmt)}" for k, v in metrics.items()) or NA


def text(value: Any) -> str:
    return NA if value is None else str(value)


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return NA
    if fmt == "d":
        return f"{int(value):d}"
    return format(value, fmt)
