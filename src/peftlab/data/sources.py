"""Where records come from: the bundled copy, a local file, or a hub dataset id, mapped to our field names."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError

BUNDLED = {"dolly15k": "databricks-dolly-15k.jsonl.gz"}
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".gz": "json", ".csv": "csv", ".parquet": "parquet"}


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise PeftlabError(f"data.source 'bundled:{name}': unknown bundled dataset; available: {', '.join(BUNDLED)}")
    return Path(str(resources.files("peftlab.data") / "bundled" / BUNDLED[name]))


def load_table(source: str, split: str) -> Any:
    """A `datasets.Dataset` from `bundled:NAME`, a local file, or a hub id (offline: a clear error)."""
    import datasets

    datasets.disable_progress_bars()
    if source.startswith("bundled:"):
        return _load_file(bundled_path(source.removeprefix("bundled:")), source)
    path = Path(source)
    if path.suffix in FILE_FORMATS or path.exists():
        if not path.is_file():
            raise PeftlabError(f"data.source: file '{source}' not found; fix: check the path (or use bundled:dolly15k)")
        return _load_file(path, source)
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types for "not cached and offline"
        raise PeftlabError(
            f"data.source '{source}': cannot load it from the hub or the local cache ({exc.__class__.__name__}); "
            "fix: pass a local .jsonl/.json/.csv/.parquet file or bundled:dolly15k"
        ) from None


def _load_file(path: Path, source: str) -> Any:
    import datasets

    fmt = FILE_FORMATS.get(path.suffix)
    if fmt is None:
        raise PeftlabError(f"data.source '{source}': unsupported file type '{path.suffix}'; use .json, .jsonl, .csv or .parquet")
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise PeftlabError(f"data.source '{source}': cannot parse it as {fmt} ({first}); fix: check the file format") from None
    if len(table) == 0:
        raise PeftlabError(f"data.source '{source}': the file holds no rows; fix: point data.source at a non-empty file")
    return table


def map_columns(table: Any, required: tuple[str, ...], optional: tuple[str, ...], mapping: dict[str, str], source: str) -> Any:
    """Rename user columns to our names; a missing column lists what the file does have."""
    found = list(table.column_names)
    renames = {}
    for field in required + optional:
        column = mapping.get(field, field)
        if column in found:
            if column != field:
                renames[column] = field
        elif field in required:
            raise PeftlabError(
                f"data.source '{source}': column '{column}' (for {field}) not found; columns found: {', '.join(found)}; "
                f"fix: set data.columns.{field} to one of them"
            )
    table = table.rename_columns(renames) if renames else table
    keep = [c for c in required + optional if c in table.column_names]
    return table.select_columns(keep)
