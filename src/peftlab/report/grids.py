"""Image grids: one PNG of rows (prompt, seed) x columns (base, adapter, ...) plus a JSON sidecar naming them.

The PNG holds only the images (diffusers' make_image_grid), so its size is exactly columns x rows cells; the
labels live in the sidecar. Grids of several runs combine into one by their columns, without generating again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from peftlab.runs import RunDir, atomic_write_json


@dataclass
class Grid:
    rows: list[str]  # one label per row, e.g. "seed 0: a wheat field"
    columns: list[str]  # one label per column, e.g. "base", "adapter"
    cell: int  # px, square cells
    cells: list[list[Image.Image]]  # cells[row][column]

    def image(self) -> Image.Image:
        from diffusers.utils import make_image_grid

        flat = [img.resize((self.cell, self.cell)) if img.size != (self.cell, self.cell) else img
                for row in self.cells for img in row]
        return make_image_grid(flat, rows=len(self.rows), cols=len(self.columns))

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self.image().save(tmp, format="PNG")
        tmp.replace(path)
        labels = {k: v for k, v in asdict(self).items() if k != "cells"}
        atomic_write_json(path.with_suffix(".json"), {**labels, "png": path.name})
        return path


def load_grid(path: Path) -> Grid:
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    cell = meta["cell"]
    with Image.open(path) as png:
        png = png.convert("RGB")
        cells = [[png.crop((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)) for c in range(len(meta["columns"]))]
                 for r in range(len(meta["rows"]))]
    return Grid(meta["rows"], meta["columns"], cell, cells)


def combine(grids: dict[str, Grid]) -> Grid:
    """Side by side: every column of every run, labelled `run: column`; a column equal pixel for pixel to one
    already taken (the same base model in two runs) is kept once."""
    first = next(iter(grids.values()))
    columns: list[str] = []
    picked: list[list[Image.Image]] = []  # per column, its cells top to bottom
    for run, grid in grids.items():
        if grid.rows != first.rows or grid.cell != first.cell:
            continue  # different prompts, seeds or sizes: not comparable cell by cell
        for index, label in enumerate(grid.columns):
            column = [row[index] for row in grid.cells]
            if any(all(a.tobytes() == b.tobytes() for a, b in zip(column, seen, strict=True)) for seen in picked):
                continue
            columns.append(f"{run}: {label}")
            picked.append(column)
    cells = [[column[r] for column in picked] for r in range(len(first.rows))]
    return Grid(first.rows, columns, first.cell, cells)


def combine_run_grids(runs: list[RunDir], path: Path, name: str = "samples/grid.png") -> Path | None:
    """One PNG (+ sidecar) from the sample grids of `runs` (RunDirs); None when fewer than two runs have one."""
    found = {run.name: run.path / name for run in runs if (run.path / name).is_file()}
    if len(found) < 2:
        return None
    return combine({run: load_grid(png) for run, png in found.items()}).save(path)
