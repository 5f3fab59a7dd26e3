"""Training curves of several runs overlaid against step, from their metrics.jsonl, as PNG files.

Uses matplotlib's object API on the Agg canvas (no pyplot, no global state, no display needed), so
it works headless and from several threads. A plot is drawn only when some run logged its metric;
non-finite values (stored as strings by json_safe) leave gaps instead of breaking the axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.columns import number
from peftlab.runs import RunDir


@dataclass(frozen=True)
class Series:
    key: str
    kind: str = "train"  # metrics.jsonl record kind: train | eval
    style: str = "-"
    label: str = ""  # appended to the run name when a plot has several series


@dataclass(frozen=True)
class PlotSpec:
    name: str  # file stem
    title: str
    ylabel: str
    series: tuple[Series, ...]
    log_y: bool = False


PLOTS = (
    PlotSpec("loss", "loss", "loss", (Series("loss", label="train"), Series("eval_loss", "eval", "--o", "eval"))),
    PlotSpec("grad_norm", "gradient norm", "grad norm", (Series("grad_norm"),), log_y=True),
    PlotSpec("lr", "learning rate", "lr", (Series("lr"),)),
    PlotSpec("memory", "memory", "GiB", (Series("mem_allocated_gib", label="allocated"),
                                          Series("mem_reserved_gib", style=":", label="reserved"),
                                          Series("mem_rss_gib", label="rss"))),
    PlotSpec("tokens_per_s", "throughput: tokens/s", "tokens/s", (Series("tokens_per_s"),)),
    PlotSpec("samples_per_s", "throughput: samples/s", "samples/s", (Series("samples_per_s"),)),
    PlotSpec("it_per_s", "throughput: it/s", "it/s", (Series("it_per_s"),)),
    PlotSpec("eval_metrics", "eval accuracy / F1", "score", (Series("eval_accuracy", "eval", "-o", "accuracy"),
                                                              Series("eval_f1", "eval", "--s", "F1"))),
)


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    path: Path


def points(records: list[dict[str, Any]], series: Series) -> tuple[list[float], list[float]]:
    """(steps, values) of one series; records without a step or a finite value are left out."""
    xs, ys = [], []
    for record in records:
        step, value = number(record.get("step")), number(record.get(series.key))
        if record.get("kind", "train") == series.kind and step is not None and value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


def draw(spec: PlotSpec, runs: list[tuple[str, list[dict[str, Any]]]]):
    """One matplotlib Figure with every run's series, or None when no run logged this metric."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    drawn = 0
    for index, (name, records) in enumerate(runs):
        for series in spec.series:
            xs, ys = points(records, series)
            if not xs:
                continue
            label = f"{name} {series.label}" if len(spec.series) > 1 and series.label else name
            ax.plot(xs, ys, series.style, color=f"C{index % 10}", label=label, markersize=4, linewidth=1.4)
            drawn += 1
    if not drawn:
        return None
    ax.set_title(spec.title)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    if spec.log_y and min(values) > 0 and max(values) / min(values) > 20:  # spikes visible without flattening the rest
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_runs(runs: list[tuple[str, RunDir]], out_dir: Path) -> list[Plot]:
    """Every plot some run has data for, saved as out_dir/<name>.png; runs are (legend label, folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = [(label, run.metrics()) for label, run in runs]
    plots = []
    for spec in PLOTS:
        fig = draw(spec, data)
        path = out_dir / f"{spec.name}.png"
        if fig is None:
            path.unlink(missing_ok=True)  # left by an earlier report into this folder: it would mislead
            continue
        fig.savefig(path, format="png")
        plots.append(Plot(spec.name, spec.title, path))
    return plots
