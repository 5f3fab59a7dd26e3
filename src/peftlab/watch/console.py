"""Console output that never crashes on a narrow encoding (gbk, cp1252, ascii), plus the progress bar.

One original run crashed after saving because the console could not encode a check mark. We write
plain text, let rich fall back to ASCII bars when the stream is not UTF-8, and make stdout/stderr
replace what they cannot encode instead of raising.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def harden_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


@lru_cache(maxsize=1)
def console() -> Console:
    harden_stdio()
    # Not a terminal (CI logs, pipes): rich would assume 80 columns and squeeze the tables.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def say(text: str = "", style: str | None = None) -> None:
    console().print(text, style=style, markup=False)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_record(record: dict[str, Any]) -> str:
    if record.get("kind") == "eval":
        parts = [f"eval step {record['step']}"] + [f"{k} {_fmt(v)}" for k, v in record.items() if k.startswith("eval_") and "runtime" not in k and "per_second" not in k]
        return "  ".join(parts)
    mem = record.get("mem_allocated_gib", record.get("mem_rss_gib"))
    return (
        f"step {record['step']}  epoch {record['epoch']:.2f}  loss {_fmt(record['loss'])}  "
        f"grad_norm {_fmt(record['grad_norm'])}  lr {_fmt(record['lr'], '.3g')}  "
        f"tok/s {_fmt(record['tokens_per_s'], '.0f')}  mem {_fmt(mem, '.2f')} GiB"
    )


class Progress:
    """A step progress bar with ETA; metric lines print above it."""

    def __init__(self, description: str = "train", enabled: bool = True) -> None:
        self.description, self.enabled = description, enabled
        self._bar: RichProgress | None = None
        self._task = None

    def start(self, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        self._bar = RichProgress(
            TextColumn(self.description),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console(),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=total, completed=done)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def log(self, record: dict[str, Any]) -> None:
        line = format_record(record)
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            say(line)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    from rich import box
    from rich.table import Table

    utf = (console().encoding or "").lower().replace("-", "").startswith("utf")
    table = Table(*headers, title=title, box=box.SIMPLE_HEAVY if utf else box.ASCII, show_lines=False)
    for row in rows:
        table.add_row(*row)
    console().print(table)
