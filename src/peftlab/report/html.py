"""`peftlab report`: one self-contained HTML page for a set of runs.

Comparison tables, training curves overlaid, per-task samples (SFT generations side by side, the
classify confusion matrix, diffusion image grids) and each run's resolved recipe and environment.
Images are embedded as base64 data URIs and there is no external CSS, font or script, so the file
opens offline and can be mailed around. The curves are also saved as PNG files beside it. A tiny
inline script marks <body data-images="ok|broken"> once every image has loaded, which the browser
test (and anyone debugging a page) can read from the DOM.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from peftlab import __version__
from peftlab.report.compare import NA, Comparison, Source, compare, definitions, main_table, verdicts, vs_table
from peftlab.report.plots import plot_runs
from peftlab.runlock import DEAD, dead_reason, shown_status
from peftlab.runs import RunDir, atomic_write_text, read_jsonl, writing_output
from peftlab.tasks import get_task, task_names
from peftlab.watch.console import say

CONFUSION_MATRIX = "confusion_matrix.png"
Labelled = tuple[str, RunDir]  # (the run's label in the comparison, its folder)
NUMERIC = re.compile(r"^[+-]?\d[\d.]*(e[+-]?\d+)?[x%]?( \([+-]?[\d.]+%\))?$")  # 1.45x, +4.2%, +0.01 (+1.3%)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1f2328; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; margin-top: 2.2rem; }
.meta { color: #59636e; margin-top: 0; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; white-space: nowrap; }
th { background: #f6f8fa; } tbody tr:nth-child(even) { background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } table.plain td.num { text-align: left; }
.scroll { overflow-x: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1rem; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #59636e; font-size: .85rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .8rem; }
.gen td { white-space: pre-wrap; max-width: 28rem; }
.status-failed, .status-interrupted, .status-unreadable, .status-dead { color: #cf222e; font-weight: 600; }
.status-completed { color: #1a7f37; } .status-running { color: #9a6700; }
details { margin: .6rem 0; } summary { cursor: pointer; font-weight: 600; }
"""

IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !img.complete || img.naturalWidth === 0; }).length;
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-broken", String(broken));
  document.body.setAttribute("data-images", broken ? "broken" : "ok");
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(headers: list[str], body: list[list[str]], table_id: str, row_keys: list[str] | None = None,
          css: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    rows = []
    for i, cells in enumerate(body):
        key = f' data-run="{esc(row_keys[i])}"' if row_keys else ""
        tds = "".join(f'<td class="num">{esc(c)}</td>' if _numeric(c) else f"<td>{esc(c)}</td>" for c in cells)
        rows.append(f"<tr{key}>{tds}</tr>")
    return (f'<div class="scroll"><table id="{esc(table_id)}" class="{css}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _numeric(text: str) -> bool:
    return NUMERIC.match(text) is not None


def image(path: Path, alt: str, caption: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


# ---------------------------------------------------------------- sections


def comparison_section(comp: Comparison) -> str:
    parts = ["<h2>Comparison</h2>", table(*main_table(comp), "comparison", [r["run"] for r in comp.rows])]
    parts += [f'<p class="meta">Note: {esc(text)}</p>' for text in [*comp.notes, *definitions(comp)]]
    if len(comp.rows) > 1:
        parts += [f"<h3>vs baseline {esc(comp.base['run'])}</h3>",
                  table(*vs_table(comp), "versus", [r["run"] for r in comp.rows]),
                  "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in verdicts(comp)) + "</ul>"]
    return f'<section id="comparison-section">{"".join(parts)}</section>'


def plots_section(runs: list[Labelled], plot_dir: Path) -> str:
    plots = plot_runs(runs, plot_dir)
    if not plots:
        return '<section id="plots"><h2>Training curves</h2><p>No run has logged metrics yet.</p></section>'
    figures = "".join(image(p.path, p.title, f"{p.title} ({p.path.name})") for p in plots)
    return f'<section id="plots"><h2>Training curves</h2><div class="grid">{figures}</div></section>'


def generations_table(runs: list[Labelled]) -> str:
    """SFT: one row per fixed prompt, the adapters' answers side by side, then the base model's."""
    gens = {label: {g.get("prompt"): g for g in read_jsonl(run.samples_path / "generations.jsonl")} for label, run in runs}
    gens = {name: by_prompt for name, by_prompt in gens.items() if by_prompt}
    if not gens:
        return ""
    prompts = list(dict.fromkeys(p for by_prompt in gens.values() for p in by_prompt))
    bases = {name: [by_prompt.get(p, {}).get("base") for p in prompts] for name, by_prompt in gens.items()}
    same_base = len({json.dumps(b) for b in bases.values()}) == 1  # e.g. identical greedy base outputs
    headers = ["prompt"] + [f"{name}: adapter" for name in gens]
    headers += ["base model"] if same_base else [f"{name}: base" for name in gens]
    body = []
    for i, prompt in enumerate(prompts):
        row = [prompt] + [by_prompt.get(prompt, {}).get("adapter", "n/a") for by_prompt in gens.values()]
        base_cells = [next(iter(bases.values()))[i]] if same_base else [b[i] for b in bases.values()]
        body.append(row + [cell if cell is not None else "n/a" for cell in base_cells])
    return "<h3>Generations</h3>" + table(headers, body, "generations", css="gen")


def images_block(title: str, items: list[tuple[Path, str]], block_id: str) -> str:
    if not items:
        return ""
    figures = "".join(image(path, caption, caption) for path, caption in items)
    return f'<h3>{esc(title)}</h3><div class="grid" id="{block_id}">{figures}</div>'


def confusion_matrix(run: RunDir) -> Path | None:
    for path in (run.path / CONFUSION_MATRIX, run.samples_path / CONFUSION_MATRIX):
        if path.is_file():
            return path
    return None


def confusion_matrices(runs: list[Labelled]) -> str:
    matrices = [(m, f"{label}: confusion matrix") for label, run in runs if (m := confusion_matrix(run))]
    return images_block("Confusion matrices", matrices, "confusion")


def sample_images(runs: list[Labelled]) -> str:
    grids = [(p, f"{label}: {p.name}") for label, run in runs for p in sorted(run.samples_path.glob("*.png"))
             if p.name != CONFUSION_MATRIX]
    return images_block("Sample images", grids, "sample-images")


# The blocks a task can declare (Task.samples), in page order.
SAMPLE_BLOCKS = {"generations": generations_table, "confusion_matrix": confusion_matrices, "images": sample_images}


def samples_section(runs: list[Labelled]) -> str:
    """The sample blocks the runs' tasks declare, each over the runs that wrote its files."""
    tasks = {run.summary().get("task") for _, run in runs}
    declared = {block for task in tasks if task in task_names() for block in get_task(task).samples}
    body = "".join(render(runs) for block, render in SAMPLE_BLOCKS.items() if block in declared)
    return f'<section id="samples"><h2>Samples</h2>{body}</section>' if body else ""


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def recipe_differences(runs: list[Labelled]) -> str:
    """The recipe fields that differ between the runs (e.g. method.name): what the comparison is about."""
    configs = {label: dict(flatten(yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}))
               for label, run in runs if run.config_path.is_file()}
    if len(configs) < 2:
        return ""
    keys = sorted({k for c in configs.values() for k in c})
    body = [[key] + [json.dumps(c[key]) if key in c else NA for c in configs.values()]
            for key in keys if len({json.dumps(c.get(key, NA)) for c in configs.values()}) > 1]
    if not body:
        return "<h3>Recipe differences</h3><p>The recipes are identical.</p>"
    differences = table(["field", *configs], body, "recipe-differences", css="plain")
    if len(body) > 12:  # runs of different tasks differ almost everywhere: keep the page scannable
        return f"<details><summary>Recipe differences ({len(body)} fields)</summary>{differences}</details>"
    return "<h3>Recipe differences</h3>" + differences


def run_details(label: str, run: Source) -> str:
    summary = run.summary()
    status = str(shown_status(run.path, summary))
    why = dead_reason(run.path, summary) if status == DEAD else " ".join(str(summary[k]) for k in ("reason", "diagnosis") if summary.get(k))
    head = (f'<summary>{esc(label)}: <span class="status-{esc(status)}">{esc(status)}</span>'
            f"{esc(' - ' + why) if why else ''}</summary>")
    env = summary.get("environment") or {}
    parts = [head]
    if env:
        parts += ["<h4>Environment</h4>", table(["key", "value"], [[k, str(v)] for k, v in flatten(env)],
                                                f"env-{label}")]
    config = getattr(run, "config_path", None)
    if config is not None and config.is_file():
        parts += ["<h4>Resolved recipe (config.yaml)</h4>", f"<pre>{esc(config.read_text(encoding='utf-8'))}</pre>"]
    rest = {k: v for k, v in summary.items() if k != "environment"}
    parts += ["<h4>summary.json</h4>", f"<pre>{esc(json.dumps(rest, indent=2, default=str))}</pre>"]
    return f"<details>{''.join(parts)}</details>"


# ---------------------------------------------------------------- the page


def show_report(runs: list[Source], out: Path, baseline: Source | None = None, option: str = "") -> Path:
    """Write the report to `out` (missing folders made; a path that cannot be written is one line naming `option`
    and `out`: runs.writing_output) and say where it and its plots are; returns the file written."""
    with writing_output(out, option):
        path = write_report(runs, out, baseline)
    say(f"report: {path} (plots as PNG in {plots_dir(path)})")
    return path


def plots_dir(out: Path) -> Path:
    """Where the report's curves go as PNG files: beside it, named after it (report.html -> report-plots/)."""
    return out.parent / f"{out.stem}-plots"


def write_report(runs: list[Source], out: Path, baseline: Source | None = None, title: str | None = None) -> Path:
    """Write the HTML report to `out` and its plots to `<out stem>-plots/`; returns `out`.

    Callable from any command that produced runs (matrix, sweep): pass the run folders, get a page.
    """
    out = Path(out)
    comp = compare(runs, baseline)
    labelled = [(row["run"], source) for row, source in zip(comp.rows, comp.sources, strict=True)]  # table order
    folders = [(label, s) for label, s in labelled if isinstance(s, RunDir)]  # a reference-metrics file has no curves
    title = title or "peftlab report: " + ", ".join(r["run"] for r in comp.rows)
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">generated {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} by peftlab {esc(__version__)}; '
        f"baseline {esc(comp.base['run'])}; every number comes from the run folders' summary.json and metrics.jsonl</p>",
        comparison_section(comp),
        recipe_differences(folders),
        plots_section(folders, plots_dir(out)),
        samples_section(folders),
        '<section id="runs"><h2>Runs</h2>' + "".join(run_details(*item) for item in labelled) + "</section>",
    ]
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="peftlab {esc(__version__)}"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body data-images=\"pending\">\n" + "\n".join(body)
            + f"\n<script>{IMAGE_CHECK}</script>\n</body></html>\n")
    atomic_write_text(out, page)
    return out
