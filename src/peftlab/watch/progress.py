"""Progress of every phase that can take more than a few seconds: what runs, for how long, and when it ends.

Progress goes to stderr, as tqdm's does: stdout keeps the results (`peftlab generate ... > answers.txt` holds the
answers only; a run's metric lines stay on stdout). On a terminal: rich's progress display, redrawn in place (n/N, elapsed and ETA; a pulsing bar where the total is
unknown, e.g. while transformers loads weights), then one plain line with the time the phase took. Anywhere else
(CI logs, pipes, files): plain lines only, no ANSI codes or carriage returns: the phase when it starts, an update
at every tenth of its total (not sooner than MIN_GAP_S after the last line, and at least every UPDATE_EVERY_S seconds),
its end with the time it took.

Sequences of runs (matrix runs, sweep trials) are `Countdown`s: one line per item with n/N and the overall ETA from
the mean time of the items done so far, not a live bar, because each item shows its own phases below it and rich
allows one live display at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from peftlab.secrets import redact
from peftlab.watch.console import console, duration, format_record, say

UPDATE_EVERY_S = 30.0  # a slow phase still shows a line this often in a log
UPDATES = 10  # plain lines per phase with a known total: at most one per tenth,
MIN_GAP_S = 2.0  # and none sooner than this after the last (a phase of a second is its start and end lines)


def eta_text(done: float, total: float | None, elapsed: float) -> str:
    """`eta 1m05s` from the mean rate so far; `eta n/a` before there is one."""
    if not total or done <= 0 or elapsed <= 0:
        return "eta n/a"
    return f"eta {duration(max(total - done, 0) * elapsed / done)}"


class Progress:
    """One phase: `with Progress("evaluation", total=40) as p: ... p.advance()`, or start/advance/stop by hand
    (the training loop's hooks). `advance(completed)` sets the count, `advance(by=n)` adds to it. `enabled=False`
    prints nothing (tests, quiet callers)."""

    def __init__(self, description: str, total: int | None = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.enabled, self.clock = description, total, enabled, clock
        self.completed = self.first = 0
        self.started_at = self.printed_at = 0.0
        self.tenth = 0
        self._bar: RichProgress | None = None
        self._task: Any = None

    def start(self, total: int | None = None, done: int = 0) -> Progress:
        if total is not None:
            self.total = total
        self.completed = self.first = done  # a resumed run's ETA counts the steps of this session only
        self.started_at = self.printed_at = self.clock()
        self.tenth = self._tenth()
        if self.enabled and not (console(stderr=True).is_terminal and self._start_bar()):
            of = f" {done}/{self.total}" if self.total else ""
            status(f"{self.description}{of} ...")
        return self

    def _start_bar(self) -> bool:
        # redirect_stdout (rich's default): the stdout lines printed meanwhile (metrics) land above the bar
        bar = RichProgress(TextColumn(self.description), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console(stderr=True),
                           transient=True)
        try:
            bar.start()
        except LiveError:  # another live display (e.g. `watch`) owns the terminal: plain lines instead
            return False
        self._bar, self._task = bar, bar.add_task(self.description, total=self.total, completed=self.completed)
        return True

    def advance(self, completed: int | None = None, by: int = 1) -> None:
        self.completed = completed if completed is not None else self.completed + by
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed)
            return
        now, tenth = self.clock(), self._tenth()
        since = now - self.printed_at
        if self.completed != self.total and ((tenth > self.tenth and since >= MIN_GAP_S) or since >= UPDATE_EVERY_S):
            self.tenth, self.printed_at = tenth, now
            status(self.status(now))

    def _tenth(self) -> int:
        return UPDATES * self.completed // self.total if self.total else 0

    def status(self, now: float | None = None) -> str:
        """`evaluation 4/40 (10%)  elapsed 3s  eta 27s`."""
        elapsed = (self.clock() if now is None else now) - self.started_at
        if not self.total:
            return f"{self.description} {self.completed}  elapsed {duration(elapsed)}"
        return (f"{self.description} {self.completed}/{self.total} ({100 * self.completed // self.total}%)  "
                f"elapsed {duration(elapsed)}  {eta_text(self.completed - self.first, self.total - self.first, elapsed)}")

    def log(self, line: str | dict[str, Any]) -> None:
        """A result line on stdout (a metrics record formatted as the console shows records), above a live bar."""
        say(format_record(line) if isinstance(line, dict) else line)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.enabled:
            count = f" ({self.completed}/{self.total})" if self.total else ""
            # short of its total: interrupted or stopped by the guard, which "done" would hide
            ended = "done in" if not self.total or self.completed >= self.total else "stopped after"
            status(f"{self.description}: {ended} {duration(self.clock() - self.started_at)}{count}")
        self.enabled = False  # stopped once: a second stop (an engine's finally after an error) prints nothing

    def cancel(self) -> None:
        """Stop without the "done" line: the phase failed, and the error says what happened."""
        self.enabled = False
        self.stop()

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cancel() if exc[0] is not None else self.stop()


def status(text: str) -> None:
    """One progress line, on stderr."""
    console(stderr=True).print(redact(text), markup=False, highlight=False)


def phase(description: str, total: int | None = None) -> Progress:
    """A phase to run under `with`: `with phase("loading model gpt2"): ...`."""
    return Progress(description, total)


class Countdown:
    """n/N over a known number of items (matrix runs, sweep trials), with the overall ETA: the mean time of the
    items done so far times the items left."""

    def __init__(self, what: str, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.clock = what, total, clock
        self.started = 0
        self.started_at = clock()

    def next(self, label: str = "") -> str:
        """Announce the next item; returns the line."""
        elapsed = self.clock() - self.started_at
        done, self.started = self.started, self.started + 1
        line = (f"[{self.what} {self.started}/{self.total}]" + (f" {label}" if label else "")
                + f"  elapsed {duration(elapsed)}  overall {eta_text(done, self.total, elapsed)}")
        status(line)
        return line

    def finish(self) -> str:
        line = f"[{self.what}s] {self.started}/{self.total} in {duration(self.clock() - self.started_at)}"
        status(line)
        return line
