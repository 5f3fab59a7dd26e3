"""Comparison of runs: the table of the original notes, computed from run folders.

Every cell comes from a summary.json; a metric a run does not have is shown as "n/a", never as
NaN arithmetic. Ratios are against a baseline run (default: the first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from peftlab.runs import RunDir
from peftlab.watch.memory import peak_gib

NA = "n/a"


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str
    higher_is_better: bool | None  # None: no ratio is printed for it


SFT_COLUMNS = (
    Column("runtime_s", "train time s", ".1f", False),
    Column("peak_mem_gib", "peak mem GiB", ".2f", False),
    Column("steps_per_s", "steps/s", ".3f", True),
    Column("samples_per_s", "samples/s", ".2f", True),
    Column("tokens_per_s", "tokens/s", ".0f", True),
    Column("steps", "steps", "d", None),
    Column("final_train_loss", "final loss", ".4f", None),
    Column("eval_loss", "eval loss", ".4f", None),
    Column("perplexity", "perplexity", ".2f", None),
)


def number(value: Any) -> float | None:
    """A finite float, or None for missing/NaN/inf/strings (how json_safe stores non-finite values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def run_row(run: RunDir) -> dict[str, Any]:
    summary = run.summary()
    row = {"run": run.name, "method": summary.get("method"), "status": summary.get("status")}
    for column in SFT_COLUMNS:
        row[column.key] = number(peak_gib(summary) if column.key == "peak_mem_gib" else summary.get(column.key))
    return row


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def comparison_rows(runs: list[RunDir], baseline: RunDir | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per run plus, per run, ratios/deltas against the baseline."""
    rows = [run_row(r) for r in runs]
    base = run_row(baseline) if baseline is not None else rows[0]
    for row in rows:
        row["vs"] = {}
        for column in SFT_COLUMNS:
            value, ref = row[column.key], base[column.key]
            if column.key == "runtime_s":
                row["vs"]["speedup"] = ratio(ref, value)  # > 1 means faster than the baseline
            elif column.key == "peak_mem_gib":
                r = ratio(value, ref)
                row["vs"]["memory_change_pct"] = None if r is None else 100.0 * (r - 1.0)
            elif column.higher_is_better:
                row["vs"][f"{column.key}_ratio"] = ratio(value, ref)
            elif column.key in ("eval_loss", "final_train_loss", "perplexity"):
                row["vs"][f"{column.key}_delta"] = None if value is None or ref is None else value - ref
    return rows, base


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return NA
    if fmt == "d":
        return f"{int(value):d}"
    return format(value, fmt)


def table_lines(rows: list[dict[str, Any]], base: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "method", "status"] + [c.title for c in SFT_COLUMNS]
    body = [[str(r["run"]), str(r["method"]), str(r["status"])] + [cell(r[c.key], c.fmt) for c in SFT_COLUMNS] for r in rows]
    return headers, body


def ratio_sentences(rows: list[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """The lines the original notes were typed by hand: '<run> is 1.45x faster, uses 4.2% more memory'."""
    lines = []
    for row in rows:
        if row["run"] == base["run"]:
            continue
        vs = row["vs"]
        speed = vs.get("speedup")
        mem = vs.get("memory_change_pct")
        speed_text = NA if speed is None else (f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower")
        mem_text = NA if mem is None else f"{abs(mem):.1f}% {'more' if mem >= 0 else 'less'} memory"
        tok = vs.get("tokens_per_s_ratio")
        tok_text = NA if tok is None else f"{tok:.2f}x tokens/s"
        loss = vs.get("eval_loss_delta")
        loss_text = NA if loss is None else f"eval loss {loss:+.4f}"
        lines.append(f"{row['run']} vs {base['run']}: {speed_text}, {mem_text}, {tok_text}, {loss_text}")
    return lines
