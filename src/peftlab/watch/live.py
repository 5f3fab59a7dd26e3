"""`peftlab watch RUN`: follow a run's metrics.jsonl live, like `tail -f` with a status line.

New metric records print as lines; below them a status line shows the step, the latest loss with a
small sparkline, steps/s, the ETA and how long ago the run last logged (a stale run is visible). It
ends when summary.json's status leaves "running". Works on a run in another process or on another
machine's shared folder: it only reads files, and reads metrics.jsonl incrementally. A run whose
process died without recording its end (SIGKILL, a full disk) is `dead` and ends the watch too.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.live import Live
from rich.text import Text

from peftlab.columns import key_metric_text, key_metrics, number
from peftlab.errors import PeftlabError
from peftlab.runlock import DEAD, dead_reason, shown_status
from peftlab.runs import RunDir, open_run, where_looked
from peftlab.secrets import redact
from peftlab.watch.console import console, duration, format_record, say

BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"  # lower eighth .. full block
ASCII_RAMP = "_.-~=+*#"
SPARK_WIDTH = 30
RATE_WINDOW = 5  # train records the steps/s estimate spans
HISTORY = 256


class MetricsTail:
    """Reads only what was appended to metrics.jsonl since the last call; an unfinished last line waits."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a torn line from a crash: the same rule as runs.read_jsonl
        return records


def sparkline(values: list[float], width: int = SPARK_WIDTH, unicode: bool = True) -> str:
    """The last `width` values as block characters (or an ASCII ramp where the console cannot encode them)."""
    ramp = BLOCKS if unicode else ASCII_RAMP
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        return ramp[len(ramp) // 2] * len(values)
    return "".join(ramp[round((v - lo) / (hi - lo) * (len(ramp) - 1))] for v in values)


def steps_per_second(train: list[dict[str, Any]]) -> float | None:
    """Recent speed from the records' step and elapsed-time fields."""
    points = [(s, t) for r in train if (s := number(r.get("step"))) is not None and (t := number(r.get("time"))) is not None]
    if not points:
        return None
    window = points[-RATE_WINDOW:]
    (s0, t0), (s1, t1) = window[0], window[-1]
    if t1 <= t0:  # a single record: the average since training started
        s0, t0 = 0.0, 0.0
    return (s1 - s0) / (t1 - t0) if t1 > t0 else None


def eta_seconds(step: float | None, max_steps: float | None, rate: float | None) -> float | None:
    if step is None or not max_steps or not rate:
        return None
    return max(max_steps - step, 0.0) / rate


def max_steps_of(run: RunDir, summary: dict[str, Any]) -> float | None:
    """The planned step count: written by the monitor at train start, else the recipe's train.max_steps."""
    if (planned := number(summary.get("max_steps"))) and planned > 0:
        return planned
    try:
        config = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
        return number((config.get("train") or {}).get("max_steps"))
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def status_line(run: RunDir, summary: dict[str, Any], train: list[dict[str, Any]], age_s: float | None,
                unicode: bool, width: int | None = None) -> str:
    """`name | status | step 50/100 (50%) | loss 1.2 sparkline | 0.5 steps/s | eta 1m40s | last log 3s ago`, fitted
    to `width` columns: the sparkline shortens, then the last-log age, sparkline, run name, loss and status go, in
    that order, so that step, steps/s and ETA stay on a 60-column terminal (a wrapped live line could not be redrawn)."""
    step = number(train[-1].get("step")) if train else None
    planned = max_steps_of(run, summary)
    rate = steps_per_second(train)
    eta = eta_seconds(step, planned, rate)
    losses = [v for r in train if (v := number(r.get("loss"))) is not None]
    running = summary.get("status", "running") == "running"  # an ended run has no ETA, and its silence is expected
    of = f"/{int(planned)} ({100 * step / planned:.0f}%)" if planned and step is not None else ""
    fields = {
        "name": run.name, "status": str(summary.get("status", "unknown")),
        "step": "waiting for the first metrics" if step is None else f"step {int(step)}{of}",
        "loss": f"loss {losses[-1]:.4g}" if losses else None,
        "rate": f"{rate:.3g} steps/s" if rate else None,
        "eta": (f"eta {duration(eta)}" if eta is not None else "eta n/a") if running else None,
        "age": f"last log {duration(age_s)} ago" if running and age_s is not None else None,  # a stale run shows here
    }

    def render(dropped: tuple[str, ...], spark: int) -> str:
        shown = {k: v for k, v in fields.items() if v is not None and k not in dropped}
        if "loss" in shown and spark:
            shown["loss"] += " " + sparkline(losses, spark, unicode)
        return " | ".join(shown.values())

    tries = [((), SPARK_WIDTH), ((), 10), (("age",), 10), (("age",), 0), (("age", "name"), 0),
             (("age", "name", "loss"), 0), (("age", "name", "loss", "status"), 0)]
    for dropped, spark in tries:
        line = render(dropped, spark)
        if width is None or len(line) <= width:
            return line
    return line


def _read_summary(run: RunDir, previous: dict[str, Any]) -> dict[str, Any]:
    try:
        return run.summary() or previous
    except (OSError, json.JSONDecodeError):
        return previous  # mid-replace on a filesystem without atomic rename: keep the last good one


def _unicode_ok() -> bool:
    return (console().encoding or "").lower().replace("-", "").startswith("utf")


def follow(run: RunDir, interval: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> str:
    """Print the run's metrics as they arrive until its status leaves "running"; returns the final status."""
    tail = MetricsTail(run.metrics_path)
    train: deque[dict[str, Any]] = deque(maxlen=HISTORY)
    summary: dict[str, Any] = {}
    unicode = _unicode_ok()
    # transient: the live line is redrawn in place on a terminal; the final one is printed below as plain text
    with Live(console=console(), auto_refresh=False, transient=True) as live:
        while True:
            summary = _read_summary(run, summary)  # before the metrics: a final status implies all lines are written
            if summary:  # else not written yet: the run is starting
                summary = {**summary, "status": shown_status(run.path, summary)}
            for record in tail.read():
                live.console.print(redact(format_record(record)), markup=False, highlight=False)  # as Progress.log
                if record.get("kind", "train") == "train":
                    train.append(record)
            age = time.time() - run.metrics_path.stat().st_mtime if run.metrics_path.exists() else None
            line = status_line(run, summary, list(train), age, unicode, live.console.width - 1)
            live.update(Text(line), refresh=True)
            if summary.get("status", "running") != "running":
                break
            sleep(interval)
    say(line)
    status = str(summary.get("status"))
    why = dead_reason(run.path, summary) if status == DEAD else summary.get("diagnosis") or summary.get("reason")
    say(f"run {status}" + (f": {why}" if why else "") + f"  ({key_metric_text(key_metrics(summary))})")
    return status


def wait_for_run(ref: str, runs_dir: Path, timeout: float, interval: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> RunDir:
    """The run `ref`, waiting up to `timeout` seconds for its folder to appear (`watch` started just before `train`)."""
    deadline = clock() + timeout
    waiting = False
    while True:
        try:
            return open_run(ref, runs_dir)
        except PeftlabError:
            if clock() >= deadline:
                raise PeftlabError(
                    f"run '{ref}' not found after waiting {timeout:g}s ({where_looked(ref, runs_dir)}); fix: check "
                    "the name with `peftlab runs` or --runs-dir, or start "
                    "the run first (--timeout SECONDS waits longer)"
                ) from None
            if not waiting:
                say(f"waiting up to {timeout:g}s for run '{ref}' to start (--timeout)")
                waiting = True
            sleep(interval)
