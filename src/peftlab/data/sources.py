"""Where records come from: the bundled copy, a local file, or a hub dataset id, mapped to our field names."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError, did_you_mean

# name -> split -> file in data/bundled (sources and licenses: data/bundled/ATTRIBUTION.md)
BUNDLED = {
    "dolly15k": {"train": "databricks-dolly-15k.jsonl.gz"},
    "banking77": {"train": "banking77-train.csv.gz", "test": "banking77-test.csv.gz"},
}
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".gz": "json", ".csv": "csv", ".parquet": "parquet"}


def bundled_path(name: str, split: str = "train") -> Path:
    if name not in BUNDLED:
        raise PeftlabError(f"data.source 'bundled:{name}': unknown bundled dataset; {did_you_mean(name, BUNDLED)}")
    if split not in BUNDLED[name]:
        raise PeftlabError(f"data.source 'bundled:{name}': no split '{split}'; {did_you_mean(split, BUNDLED[name])}")
    return Path(str(resources.files("peftlab.data") / "bundled" / BUNDLED[name][split]))


def file_format(path: Path) -> str | None:
    """datasets' builder for a file: by its suffix, or the one before .gz (x.csv.gz is csv)."""
    suffixes = path.suffixes
    if len(suffixes) > 1 and suffixes[-1] == ".gz" and suffixes[-2] in FILE_FORMATS:
        return FILE_FORMATS[suffixes[-2]]
    return FILE_FORMATS.get(path.suffix)


def load_table(source: str, split: str) -> Any:
    """A `datasets.Dataset` from `bundled:NAME`, a local file, or a hub id (offline: a clear error)."""
    import datasets

    datasets.disable_progress_bars()
    if source.startswith("bundled:"):
        return _load_file(bundled_path(source.removeprefix("bundled:"), split), source)
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

    fmt = file_format(path)
    if fmt is None:
        raise PeftlabError(f"data.source '{source}': unsupported file type '{path.suffix}'; use .json, .jsonl, .csv or .parquet")
    no_rows = f"data.source '{source}': the file holds no rows; fix: point data.source at a non-empty file"
    if path.stat().st_size == 0:  # datasets fails on it with a bare StopIteration
        raise PeftlabError(no_rows)
    # pyarrow reads bad UTF-8 lazily (a UnicodeDecodeError when a row is used): check it first.
    bad = not_utf8_line(path) if fmt in ("json", "csv") else None
    if bad:
        raise PeftlabError(f"data.source '{source}': cannot parse it as {fmt}: {bad}; fix: save the file as UTF-8")
    if fmt in ("json", "csv") and only_whitespace(path):  # datasets: 'Instruction "train" corresponds to no data!'
        raise PeftlabError(no_rows)
    try:
        with quiet_datasets():
            table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:
        bad = first_bad_line(path, fmt)
        if bad:
            raise PeftlabError(f"data.source '{source}': cannot parse it as {fmt}: {bad}; fix: correct or remove "
                               "that line") from None
        raise PeftlabError(f"data.source '{source}': cannot parse it as {fmt} ({root_cause(exc)}); "
                           "fix: check the file format") from None
    if len(table) == 0:
        raise PeftlabError(no_rows)
    return table


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets logs its own copy of a parse error before raising: ours is the one line the user sees."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def root_cause(exc: BaseException) -> str:
    """The parser's message: datasets wraps it (pandas', pyarrow's) in a bare "An error occurred while
    generating the dataset"."""
    inner = exc.__cause__ or exc
    return " ".join(str(inner).split())[:200] or inner.__class__.__name__


def _open_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def only_whitespace(path: Path) -> bool:
    """A text file of blank lines (streamed: big files stop at their first character)."""
    with _open_bytes(path) as fh:
        return not any(line.strip() for line in fh)


def not_utf8_line(path: Path) -> str | None:
    """`line N: not UTF-8 text (...)` for the first line that does not decode, or None (streamed: big files)."""
    with _open_bytes(path) as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {number}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
    return None


def first_bad_line(path: Path, fmt: str) -> str | None:
    """`line N: what is wrong` for the first line of a JSON Lines / JSON / CSV file that cannot be read,
    or None when every line reads (the problem is elsewhere). We re-read the file ourselves because the
    parsers behind datasets (pyarrow, pandas) report batch rows or nothing at all, not file lines."""
    if fmt not in ("json", "csv"):
        return None
    bad = not_utf8_line(path)
    if bad:
        return bad
    with _open_bytes(path) as fh:
        text = fh.read().decode("utf-8").removeprefix("\ufeff")
    return _bad_csv_line(text) if fmt == "csv" else _bad_json_line(text)


def _bad_json_line(text: str) -> str | None:
    if text.lstrip().startswith("["):  # one JSON document (a list of records)
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
        return None
    for number, line in enumerate(text.splitlines(), 1):  # JSON Lines: one object per line
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}, column {exc.colno}: {exc.msg}"
        if not isinstance(record, dict):
            return f"line {number}: a JSON {type(record).__name__}, not an object {{\"column\": value, ...}}"
    return None


def _bad_csv_line(text: str) -> str | None:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        for row in reader:
            if row and header is not None and len(row) != len(header):
                return f"line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
    except csv.Error as exc:
        return f"line {reader.line_num}: {exc}"
    return None


def map_columns(table: Any, required: tuple[str, ...], optional: tuple[str, ...], mapping: dict[str, str], source: str) -> Any:
    """Rename user columns to our names; a missing column lists what the file does have.

    Explicit mappings claim their columns first, so {instruction: context, context: instruction} swaps
    them and {response: output} wins over a same-named "response" column; one column feeds one field."""
    found = list(table.column_names)
    fields = required + optional

    def missing(field: str, column: str, why: str = "not found") -> PeftlabError:
        return PeftlabError(
            f"data.source '{source}': column '{column}' (for {field}) {why}; columns found: {', '.join(found)}; "
            f"fix: set data.columns.{field} to one of them"
        )

    chosen = {f: mapping[f] for f in fields if f in mapping}
    for field, column in chosen.items():
        if column not in found:
            raise missing(field, column)
        if list(chosen.values()).count(column) > 1:
            raise PeftlabError(f"data.columns: column '{column}' is mapped to more than one field; fix: one column per field")
    for field in fields:
        if field not in chosen and field in found and field not in chosen.values():
            chosen[field] = field
    for field in required:
        if field not in chosen:
            raise missing(field, field, "not found" if field not in found else "is mapped to another field")
    # Two-step rename through unique names, so that swapped or clashing names never collide.
    table = table.select_columns(list(chosen.values()))
    table = table.rename_columns({column: f"__peftlab_{field}" for field, column in chosen.items()})
    table = table.rename_columns({f"__peftlab_{field}": field for field in chosen})
    return table.select_columns([f for f in fields if f in chosen])
