"""Console output that never crashes on a narrow encoding (gbk, cp1252, ascii); progress bars are in progress.py.

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

from peftlab.secrets import redact


def harden_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


@lru_cache(maxsize=2)
def console(stderr: bool = False) -> Console:
    harden_stdio()
    # Not a terminal (CI logs, pipes): rich would assume 80 columns and squeeze the tables; an explicit
    # COLUMNS is the user's width either way. In a multi-process run only rank 0 speaks.
    quiet = int(os.environ.get("RANK", "0")) != 0
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200
    return Console(highlight=False, soft_wrap=True, width=width, quiet=quiet, stderr=stderr)


def say(text: str = "", style: str | None = None) -> None:
    console().print(redact(text), style=style, markup=False)


def say_error(text: str) -> None:
    """An error line, on stderr (so `peftlab ... > out.txt` still shows it, and scripts can tell them apart)."""
    console(stderr=True).print(redact(text), markup=False)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_record(record: dict[str, Any]) -> str:
    """A metrics.jsonl record as one console line (training prints it, `peftlab watch` replays it)."""
    if record.get("kind") == "epoch":  # not a step: its own line, or `watch` showed `loss -  grad_norm -  lr -`
        return (f"epoch {record['epoch']:g}: {record['epoch_time_s']:.1f} s ({record['eval_time_s']:.1f} s eval), "
                f"{record['tokens_per_s']:.0f} real / {record['padded_tokens_per_s']:.0f} padded tokens/s, "
                f"peak {record.get('peak_mem_allocated_gib', record.get('peak_mem_rss_gib'))} GiB")
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


def print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A table; one wider than the console becomes one block per row (`header  value` lines), so that
    names and numbers are never cut to fit (rich would end them with an ellipsis, '?' on an ASCII console)."""
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table

    utf = (console().encoding or "").lower().replace("-", "").startswith("utf")
    table = Table(*headers, title=title, box=box.SIMPLE_HEAVY if utf else box.ASCII, show_lines=False)
    for row in rows:
        table.add_row(*row)
    natural = Measurement.get(console(), console().options.update_width(10**6), table).maximum
    if natural <= console().width:
        console().print(table)
        return
    if title:
        say(title)
    pad = max(map(len, headers), default=0)
    for number, row in enumerate(rows, 1):
        say(f"[{number}/{len(rows)}]")
        for header, cell in zip(headers, row, strict=False):
            say(f"  {header.ljust(pad)}  {cell}")


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h03m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
