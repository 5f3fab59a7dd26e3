"""Labelled texts (Banking77 intents, or any text + label table) -> tokenized rows with integer labels.

In the original experiment the `label` column silently vanished in preprocessing. Here every step
that could lose or corrupt labels checks them and stops with a one-line error: the label column at
load, every value against the label set, at least two classes, every class present in train. The task
checks once more on the first batch the model sees.

The validation split is seeded and stratified (sklearn's train_test_split): Banking77's 10,003 train
rows with data.eval_fraction 0.1 give the original 9,002 / 1,001, every intent on both sides.
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from peftlab.config import DataConfig
from peftlab.data.fingerprint import map_fingerprint
from peftlab.data.sources import file_format, load_table, map_columns
from peftlab.errors import PeftlabError
from peftlab.watch.progress import phase

FIELDS = ("text", "label")
# The label list a bundled source ships (Banking77's categories.json): it fixes the label ids.
BUNDLED_LABELS = {"banking77": "banking77-categories.json.gz"}


@dataclass
class ClassDataStats:
    train_rows: int
    eval_rows: int
    test_rows: int
    num_labels: int
    train_per_class_min: int
    train_per_class_max: int
    tokens_mean: float
    tokens_p90: float
    tokens_max: int
    truncated: int
    truncation_rate: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClassData:
    train: Any  # datasets.Dataset with input_ids, attention_mask, labels
    eval: Any | None
    test: Any | None
    labels: list[str]  # id -> name
    stats: ClassDataStats


def build_class_data(cfg: DataConfig, tokenizer: Any, seed: int) -> ClassData:
    table, feature_names = load_labelled(cfg.source, cfg.split, cfg)
    names = label_set(cfg, feature_names, table["label"])
    table = keep_labels(table, names, cfg, f"data.source '{cfg.source}'")
    if cfg.max_samples and cfg.max_samples < len(table):
        table = _stratified_part(table, cfg.max_samples, cfg, seed, "data.max_samples")
    check_classes(list(table["label"]), names, cfg.source)
    train, evaluation = split(table, cfg, seed)
    check_classes(list(train["label"]), names, f"{cfg.source} (train part after the validation split)")
    test = load_test(cfg, names)
    label2id = {name: i for i, name in enumerate(names)}
    train, evaluation, test = (encode(t, tokenizer, label2id, cfg.max_length, part) if t is not None else None
                               for t, part in ((train, "train"), (evaluation, "validation"), (test, "test")))
    stats = _stats(train, evaluation, test, len(names), cfg.max_length)
    columns = ["input_ids", "attention_mask", "labels"]
    train, evaluation, test = (t.select_columns(columns) if t is not None else None for t in (train, evaluation, test))
    return ClassData(train, evaluation, test, labels=names, stats=stats)


def load_labelled(source: str, split_name: str, cfg: DataConfig) -> tuple[Any, list[str] | None]:
    """(table with columns text and label as strings, the label names of a ClassLabel column or None)."""
    from datasets import ClassLabel, Value

    table = map_columns(load_table(source, split_name), FIELDS, (), cfg.columns, source)
    feature = table.features["label"]
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    if names is not None:  # hub copies (e.g. PolyAI/banking77) store ids: match labels by name, not position
        table = table.cast_column("label", Value("int64")).map(lambda b: {"label": feature.int2str(b["label"])}, batched=True)
    missing = sum(1 for v in list(table["label"]) if v is None or v == "")
    if missing:
        raise PeftlabError(
            f"data.source '{source}': {missing} row(s) have an empty label (column '{cfg.columns.get('label', 'label')}'); "
            "fix: drop or label those rows"
        )
    return table.cast_column("label", Value("string")), names


def label_set(cfg: DataConfig, feature_names: list[str] | None, labels: list[str]) -> list[str]:
    """The label names in id order: the recipe's list, else the source's own, else the sorted labels found."""
    names = cfg.classify.labels or _bundled_labels(cfg.source) or feature_names
    if names is None:
        found = set(labels)
        names = sorted(found, key=lambda v: (0, int(v), v) if v.lstrip("-").isdigit() else (1, 0, v))
    duplicates = [n for n, c in Counter(names).items() if c > 1]
    if duplicates:
        raise PeftlabError(f"data.classify.labels: {duplicates[:3]} listed twice; fix: list each label once")
    if cfg.classify.max_classes:
        names = names[: cfg.classify.max_classes]
    return [str(n) for n in names]


def _bundled_labels(source: str) -> list[str] | None:
    name = source.removeprefix("bundled:")
    if not source.startswith("bundled:") or name not in BUNDLED_LABELS:
        return None
    path = resources.files("peftlab.data") / "bundled" / BUNDLED_LABELS[name]
    with gzip.open(str(path), "rt", encoding="utf-8") as fh:
        return json.load(fh)


def keep_labels(table: Any, names: list[str], cfg: DataConfig, where: str) -> Any:
    """Rows of the label set. With max_classes the other classes are dropped on purpose; otherwise a label
    outside the set is an error (a typo, another dataset's label ids, a shifted column)."""
    known = set(names)
    if cfg.classify.max_classes:
        return table.filter(lambda row: row["label"] in known)
    outside = Counter(v for v in list(table["label"]) if v not in known)
    if outside:
        examples = ", ".join(f"'{v}' ({n} rows)" for v, n in outside.most_common(3))
        raise PeftlabError(
            f"{where}: {sum(outside.values())} row(s) have labels outside the label set of {len(names)}, e.g. {examples}; "
            "fix: correct data.columns.label, add them to data.classify.labels, or keep a subset with data.classify.max_classes"
        )
    return table


def check_classes(labels: list[str], names: list[str], where: str) -> None:
    counts = Counter(labels)
    if len(counts) < 2:
        only = next(iter(counts), "none")
        raise PeftlabError(
            f"data.source '{where}': every row has the same label ('{only}', {len(labels)} rows); a classifier needs at "
            "least 2 classes; fix: check data.columns.label or use more data"
        )
    absent = [n for n in names if n not in counts]
    if absent:
        raise PeftlabError(
            f"data.source '{where}': {len(absent)} class(es) of the label set have no training rows, e.g. "
            f"{', '.join(repr(a) for a in absent[:3])}; fix: drop them from data.classify.labels, lower "
            "data.classify.max_classes, or add rows"
        )


def split(table: Any, cfg: DataConfig, seed: int) -> tuple[Any, Any | None]:
    """Seeded train/validation split, stratified by label when data.classify.stratify (sklearn semantics:
    a fraction rounds the validation size up, 0.1 of 10,003 is 1,001)."""
    if cfg.eval_fraction == 0:
        return table, None
    n_eval = math.ceil(len(table) * cfg.eval_fraction)
    size: float | int = cfg.eval_fraction
    if cfg.eval_max_samples and n_eval > cfg.eval_max_samples:
        size = cfg.eval_max_samples
    rest, held_out = _split_indices(table, size, cfg, seed, "data.eval_fraction")
    return table.select(rest), table.select(held_out)


def _stratified_part(table: Any, n: int, cfg: DataConfig, seed: int, field: str) -> Any:
    _, part = _split_indices(table, n, cfg, seed, field)
    return table.select(sorted(part))


def _split_indices(table: Any, size: float | int, cfg: DataConfig, seed: int, field: str) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    labels = list(table["label"])
    stratify = labels if cfg.classify.stratify else None
    if stratify is not None:
        label, count = min(Counter(labels).items(), key=lambda kv: kv[1])
        if count < 2:
            raise PeftlabError(
                f"{field}: class '{label}' has {count} row, too few for a stratified split; fix: add rows, drop it from "
                "data.classify.labels, or set data.classify.stratify=false"
            )
        classes = len(set(labels))
        if isinstance(size, int) and size < classes:  # sklearn's words: "The test_size = 3 should be greater or ..."
            raise PeftlabError(f"{field}: {size} rows are fewer than the {classes} classes, and a stratified part holds "
                               f"one row of each at least; fix: set {field} to {classes} or more, or "
                               "data.classify.stratify=false")
    try:
        return train_test_split(list(range(len(table))), test_size=size, stratify=stratify, random_state=seed)
    except ValueError as exc:  # e.g. fewer held-out rows than classes
        raise PeftlabError(f"{field}: cannot split {len(table)} rows that way ({exc}); fix: raise it or use more data") from None


def load_test(cfg: DataConfig, names: list[str]) -> Any | None:
    """The held-out test rows: a split of the source (bundled, hub) or a local file, on the same label set."""
    ref = cfg.classify.test
    if ref is None:
        return None
    if file_format(Path(ref)) is not None or Path(ref).exists():
        source, split_name = ref, "train"
    elif _is_local(cfg.source):
        raise PeftlabError(
            f"data.classify.test: '{ref}' is a split name, but data.source '{cfg.source}' is a single local file; "
            "fix: set data.classify.test to a test file, or null for no test set"
        )
    else:
        source, split_name = cfg.source, ref
    table, _ = load_labelled(source, split_name, cfg)
    return keep_labels(table, names, cfg, f"data.classify.test '{ref}'")


def _is_local(source: str) -> bool:
    return not source.startswith("bundled:") and (file_format(Path(source)) is not None or Path(source).exists())


def encode(table: Any, tokenizer: Any, label2id: dict[str, int], max_length: int, part: str = "rows") -> Any:
    """input_ids cut at max_length (padding happens per batch, in the collator), integer labels, and the
    untruncated length for the stats."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(list(batch["text"]))["input_ids"]
        progress.advance(by=len(ids))
        return {
            "input_ids": [x[:max_length] for x in ids],
            "attention_mask": [[1] * min(len(x), max_length) for x in ids],
            "labels": [label2id[v] for v in batch["label"]],
            "full_length": [len(x) for x in ids],
        }

    # datasets fingerprints a map by pickling the function, tokenizer included: 15 s of CPU for Gemma 3's 262k
    # vocabulary, each time. The table's own fingerprint and what `tokenize` depends on identify the result as well.
    fingerprint = map_fingerprint(table, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                                  sorted(label2id.items()), max_length)
    with phase(f"tokenizing {part}", total=len(table)) as progress:
        encoded = table.map(tokenize, batched=True, remove_columns=table.column_names, new_fingerprint=fingerprint)
        progress.advance(len(table))  # a cache hit never calls `tokenize`: the rows are ready all the same
        return encoded


def _stats(train: Any, evaluation: Any | None, test: Any | None, num_labels: int, max_length: int) -> ClassDataStats:
    counts = Counter(list(train["labels"]))
    full = list(train["full_length"])
    lengths = sorted(min(n, max_length) for n in full)
    truncated = sum(1 for n in full if n > max_length)
    return ClassDataStats(
        train_rows=len(train),
        eval_rows=len(evaluation) if evaluation is not None else 0,
        test_rows=len(test) if test is not None else 0,
        num_labels=num_labels,
        train_per_class_min=min(counts[i] for i in range(num_labels)),
        train_per_class_max=max(counts[i] for i in range(num_labels)),
        tokens_mean=round(statistics.fmean(lengths), 1),
        tokens_p90=float(lengths[int(0.9 * (len(lengths) - 1))]),
        tokens_max=lengths[-1],
        truncated=truncated,
        truncation_rate=round(truncated / len(full), 4),
    )
