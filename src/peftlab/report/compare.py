"""Comparison of runs: the tables of the original notes, computed from run folders.

Every cell comes from a summary.json; a metric a run does not have is "n/a", never NaN arithmetic.
Ratios and deltas are against a baseline (default: the first run), and only between runs of one task:
a loss, a metric or a throughput of another task measures something else (an SFT loss against a diffusion
loss gave "final loss -95%"), so runs of other tasks are shown without deltas, under a one-line note.
Columns are task-aware: a task
declares the columns it always shows and its key metrics, and any other known column appears as
soon as one of the compared runs carries it, so a new task plugs in by writing the usual keys.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from peftlab.columns import ALWAYS, BY_NAME, COLUMNS, NA, Column, cell, text, view
from peftlab.errors import PeftlabError, did_you_mean
from peftlab.runlock import shown_status

FORMATS = ("table", "markdown", "csv", "json")


class Source(Protocol):
    """A run folder, or a JSON file of reference metrics: anything with a name, a path and a summary."""

    path: Path

    @property
    def name(self) -> str: ...

    def summary(self) -> dict[str, Any]: ...


@dataclass
class ReferenceFile:
    """Reference metrics from a previous experiment, e.g. {"test_accuracy": 0.93, "peak_mem_allocated_gib": 7.2}."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.stem

    def summary(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PeftlabError(f"baseline file '{self.path}': not readable JSON ({exc.__class__.__name__}); "
                               "fix: pass a run or a JSON object of metrics") from None
        if not isinstance(data, dict):
            raise PeftlabError(f"baseline file '{self.path}': expected a JSON object of metrics, found "
                               f"{type(data).__name__}; fix: e.g. {{\"test_accuracy\": 0.93}}")
        return data


def open_source(ref: str, runs_dir: Path) -> Source:
    """A run by name or folder, or (for baselines) a JSON file of reference metrics."""
    from peftlab.runs import open_run

    path = Path(ref)
    if path.is_file() and path.suffix == ".json":
        return ReferenceFile(path)
    return open_run(ref, runs_dir)


@dataclass
class Comparison:
    sources: list[Source]  # in row order
    rows: list[dict[str, Any]]  # one per source, raw numbers (None = missing) plus row["vs"]
    base: dict[str, Any]
    columns: list[Column]  # the visible ones, in display order
    notes: list[str] = field(default_factory=list)  # shown under the tables


def run_row(source: Source) -> dict[str, Any]:
    summary = source.summary()
    row = {"run": source.name, "task": summary.get("task"), "method": summary.get("method"),
           "status": shown_status(source.path, summary)}
    row.update({c.name: c.read(summary) for c in COLUMNS})
    # e.g. classify's f1_definition: which F1 "f1" is; shown under the tables
    row["definitions"] = {k: v for k, v in summary.items() if k.endswith("_definition") and isinstance(v, str)}
    return row


def definitions(comp: Comparison) -> list[str]:
    return list(dict.fromkeys(text for row in comp.rows for text in row["definitions"].values()))


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def speedup(row: dict[str, Any], base: dict[str, Any]) -> float | None:
    """> 1: faster than the baseline. Wall times compare only runs that did the same number of optimizer steps;
    runs of different lengths (a 120-step run against a 12-step one) compare their time per step instead."""
    if row.get("steps") is not None and base.get("steps") is not None and row["steps"] != base["steps"]:
        return ratio(row.get("steps_per_s"), base.get("steps_per_s"))
    return ratio(base.get("runtime_s"), row.get("runtime_s"))


def versus(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """Ratios and deltas of one row against the baseline row; None where either side is missing."""
    vs: dict[str, float | None] = {}
    for c in COLUMNS:
        value, ref = row[c.name], base[c.name]
        if c.kind == "time":
            vs["speedup"] = speedup(row, base)
        elif c.kind == "memory":
            r = ratio(value, ref)
            vs[f"{c.name}_change_pct"] = None if r is None else 100.0 * (r - 1.0)
            vs[f"{c.name}_delta"] = None if r is None else value - ref
        elif c.kind == "rate":
            vs[f"{c.name}_ratio"] = ratio(value, ref)
            vs[f"{c.name}_delta"] = None if value is None or ref is None else value - ref
        elif c.kind == "metric":
            delta = None if value is None or ref is None else value - ref
            r = ratio(value, ref)
            vs[f"{c.name}_delta"] = delta
            vs[f"{c.name}_delta_pct"] = None if r is None else 100.0 * (r - 1.0)
    return vs


def compare(runs: list[Source], baseline: Source | None = None) -> Comparison:
    """One row per run (the baseline first if it is not among them), with ratios/deltas against it."""
    if not runs:
        raise PeftlabError("nothing to compare: no runs given; fix: pass run names or folders (see `peftlab runs`)")
    if baseline is not None and not any(_same(baseline, r) for r in runs):
        runs = [baseline, *runs]
    rows = [run_row(r) for r in runs]
    names = [r["run"] for r in rows]
    for row, source in zip(rows, runs, strict=True):
        if names.count(row["run"]) > 1:  # same name in different folders: say which folder
            row["run"] = f"{Path(source.path).parent.name}/{row['run']}"
    base = rows[next((i for i, r in enumerate(runs) if baseline is not None and _same(baseline, r)), 0)]
    for row in rows:
        vs = versus(row, base)
        row["vs"] = vs if same_task(row, base) else dict.fromkeys(vs)
    apart = [f"{r['run']} ({r['task']})" for r in rows if not same_task(r, base)]
    notes = [f"not compared with baseline {base['run']} ({base['task']}), another task: {', '.join(apart)}; "
             "compare runs of one task, or pass --baseline a run of theirs"] if apart else []
    return Comparison(runs, rows, base, visible_columns(rows), notes)


def same_task(row: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether two rows measure the same thing; a reference-metrics file may name no task (then it does)."""
    return row["task"] is None or base["task"] is None or row["task"] == base["task"]


def _same(a: Source, b: Source) -> bool:
    return Path(a.path).resolve() == Path(b.path).resolve()


def visible_columns(rows: list[dict[str, Any]]) -> list[Column]:
    wanted = set(ALWAYS)
    for row in rows:
        wanted.update(view(row["task"]).columns)
    return [c for c in COLUMNS if c.name in wanted or any(row[c.name] is not None for row in rows)]


# ---------------------------------------------------------------- rendering


def signed(value: float | None, fmt: str, suffix: str = "") -> str:
    return NA if value is None else f"{value:+{fmt}}{suffix}"


def main_table(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "task", "method", "status"] + [c.title for c in comp.columns]
    body = [[text(r["run"]), text(r["task"]), text(r["method"]), text(r["status"])]
            + [cell(r[c.name], c.fmt) for c in comp.columns] for r in comp.rows]
    return headers, body


def vs_columns(comp: Comparison) -> list[tuple[str, Column]]:
    """(vs key, column) pairs worth a column: kinds that compare, where at least one row has a value."""
    pairs = []
    for c in comp.columns:
        key = {"time": "speedup", "memory": f"{c.name}_change_pct", "rate": f"{c.name}_ratio",
               "metric": f"{c.name}_delta"}.get(c.kind)
        if key and any(r["vs"][key] is not None for r in comp.rows):
            pairs.append((key, c))
    return pairs


def vs_text(row: dict[str, Any], key: str, column: Column) -> str:
    value = row["vs"][key]
    if value is None:
        return NA
    if column.kind == "time":
        return f"{value:.2f}x"
    delta = row["vs"].get(f"{column.name}_delta")
    if column.kind == "rate":  # the ratio, and the absolute difference
        return f"{value:.2f}x" + ("" if delta is None else f" ({signed(delta, column.fmt)})")
    if column.kind == "memory":  # the absolute difference, and the relative one
        return ("" if delta is None else f"{signed(delta, column.fmt)} GiB ") + f"({signed(value, '.1f', '%')})"
    pct = row["vs"][f"{column.name}_delta_pct"]
    return signed(value, column.fmt) + ("" if pct is None else f" ({pct:+.1f}%)")


def vs_table(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    pairs = vs_columns(comp)
    titles = {"time": "speedup", "memory": "{} change", "rate": "{} ratio", "metric": "{} delta"}
    headers = ["run"] + [titles[c.kind].format(c.title) for _, c in pairs]
    body = [[r["run"] + (" (baseline)" if r is comp.base else "")] + [vs_text(r, k, c) for k, c in pairs]
            for r in comp.rows]
    return headers, body


def verdicts(comp: Comparison) -> list[str]:
    """The lines the original notes were typed by hand: '<run> vs <base>: 1.45x faster, 4.2% more memory, ...'."""
    lines = []
    for row in comp.rows:
        if row is comp.base or not same_task(row, comp.base):
            continue
        vs = row["vs"]
        speed, mem = vs["speedup"], vs["peak_mem_gib_change_pct"]
        parts = [f"speed {NA}" if speed is None else (f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"),
                 f"memory {NA}" if mem is None else f"{abs(mem):.1f}% {'more' if mem >= 0 else 'less'} memory"]
        rate = next((n for n in view(row["task"]).rate if vs[f"{n}_ratio"] is not None), None)
        if rate:
            parts.append(f"{vs[f'{rate}_ratio']:.2f}x {BY_NAME[rate].title}")
        for group in view(row["task"]).key_metrics:
            name = next((n for n in group if vs.get(f"{n}_delta") is not None), None)
            if name:  # rates among the key metrics are covered by the ratio above
                parts.append(f"{BY_NAME[name].title} {signed(vs[f'{name}_delta'], BY_NAME[name].fmt)}")
        lines.append(f"{row['run']} vs {comp.base['run']}: {', '.join(parts)}")
    return lines


def markdown_table(headers: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, body)])


def as_json(comp: Comparison) -> str:
    return json.dumps({"baseline": comp.base["run"], "columns": [c.name for c in comp.columns], "runs": comp.rows,
                       "notes": comp.notes}, indent=2)


def as_csv(comp: Comparison) -> str:
    """One flat row per run: raw values, then the vs-baseline numbers; 'n/a' where missing."""
    pairs = vs_columns(comp)
    extra = [k for key, c in pairs for k in (key, f"{c.name}_delta_pct")[: 2 if c.kind == "metric" else 1]]
    keys = ["run", "task", "method", "status"] + [c.name for c in comp.columns]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys + [f"vs_{k}" for k in extra])
    for r in comp.rows:
        writer.writerow([NA if r[k] is None else r[k] for k in keys] + [NA if r["vs"][k] is None else r["vs"][k] for k in extra])
    return out.getvalue()


def render(comp: Comparison, fmt: str) -> str:
    """The comparison as text in a machine- or document-friendly format (`table` goes through rich instead)."""
    if fmt == "json":
        return as_json(comp)
    if fmt == "csv":
        return as_csv(comp)
    if fmt == "markdown":
        parts = [markdown_table(*main_table(comp)), "", f"vs baseline `{comp.base['run']}`:", "",
                 markdown_table(*vs_table(comp))]
        parts += [""] + [f"- {line}" for line in verdicts(comp)] if len(comp.rows) > 1 else []
        parts += [""] + [f"Note: {note}" for note in [*comp.notes, *definitions(comp)]] if comp.notes or definitions(comp) else []
        return "\n".join(parts) + "\n"
    raise PeftlabError(f"--format '{fmt}': unknown; {did_you_mean(fmt, FORMATS)}")


def transpose(headers: list[str], body: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """One column per run, one row per field: what still fits a terminal when there are many columns."""
    return [headers[0]] + [row[0] for row in body], [[h] + [row[i] for row in body] for i, h in enumerate(headers) if i]


def print_fitting(headers: list[str], body: list[list[str]], title: str) -> None:
    from peftlab.watch.console import console, print_table

    natural = sum(max(len(h), *(len(row[i]) for row in body)) + 3 for i, h in enumerate(headers))
    print_table(*(transpose(headers, body) if natural > console().width else (headers, body)), title=title)


def print_comparison(comp: Comparison, fmt: str = "table") -> None:
    from peftlab.watch.console import say

    if fmt != "table":
        import typer

        typer.echo(render(comp, fmt), nl=False)
        return
    print_fitting(*main_table(comp), title="comparison")
    if len(comp.rows) > 1:
        print_fitting(*vs_table(comp), title=f"vs baseline {comp.base['run']}")
        for line in verdicts(comp):
            say(line)
    for note in [*comp.notes, *definitions(comp)]:
        say(f"note: {note}")
