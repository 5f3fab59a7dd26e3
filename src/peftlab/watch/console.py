"""Console output that never crashes on a narrow encoding (gbk, cp1252, ascii), plus the progress bar.

One original run crashed after saving because the console could not encode a check mark. We write
plain text, let rich fall back to ASCII bars when the stream is not UTF-8, and make stdout/stderr
replace what they cannot encode instead of raising.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from peftlab.secrets import redact


def harden_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


@lru_cache(maxsize=1)
def console() -> Console:
    harden_stdio()
    # Not a terminal (CI logs, pipes): rich would assume 80 columns and squeeze the tables.
    # In a multi-process run only rank 0 speaks.
    quiet = int(os.environ.get("RANK", "0")) != 0
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200, quiet=quiet)


def say(text: str = "", style: str | None = None) -> None:
    console().print(redact(text), style=style, markup=False)


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
    peak = record.get("peak_mem_allocated_gib", record.get("peak_mem_rss_gib"))
    # diffusion logs micro-steps/s (the original's "it/s"), the text tasks tokens/s
    rate = (f"it/s {_fmt(record.get('it_per_s'), '.3g')}" if "it_per_s" in record and "tokens_per_s" not in record
            else f"tok/s {_fmt(record.get('tokens_per_s'), '.0f')}")
    # .get: `peftlab watch` also formats records of other tasks, which may not log every key
    return (
        f"step {record.get('step')}  epoch {_fmt(record.get('epoch'), '.2f')}  loss {_fmt(record.get('loss'))}  "
        f"grad_norm {_fmt(record.get('grad_norm'))}  lr {_fmt(record.get('lr'), '.3g')}  "
        f"{rate}  mem {_fmt(mem, '.2f')} GiB" + (f" (peak {_fmt(peak, '.2f')})" if peak is not None else "")
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
        line = redact(format_record(record))
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


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h03m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
