"""Property tests: random and mutated recipes, --set strings and data files never raise anything but a
PeftlabError; everything else they produce is a valid recipe or a model-ready dataset."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab.config import DataConfig, ModelConfig, Recipe, builtin_recipes, load_recipe, with_overrides
from peftlab.data.instructions import InstructionData, build_instruction_data
from peftlab.errors import PeftlabError
from peftlab.models.loader import load_tokenizer

BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATA_BOUNDED = settings(BOUNDED, max_examples=12)  # each example is a real datasets load

SECTIONS = {name: list(field.annotation.model_fields) for name, field in Recipe.model_fields.items()
            if hasattr(field.annotation, "model_fields")}
KEYS = sorted({*SECTIONS, *(k for keys in SECTIONS.values() for k in keys), "name", "seed", "task", "lora", "quant"})
TINY_TEXT = (Path(str(builtin_recipes()["tiny-gemma2-dolly"]))).read_text()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["preset:tiny-gemma2", "lora", "qlora", "bundled:dolly15k", "1e-4", "all-linear"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)
keys = st.sampled_from(KEYS) | st.text(max_size=8)
mappings = st.recursive(st.dictionaries(keys, values, max_size=4), lambda inner: st.dictionaries(keys, inner | values, max_size=4),
                        max_leaves=12)
counter = itertools.count()


def clean(call) -> object:
    """The result of `call()`, or None for a PeftlabError; any other exception fails the test."""
    try:
        return call()
    except PeftlabError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write(folder: Path, suffix: str, text: str) -> Path:
    path = folder / f"case{next(counter)}{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


@BOUNDED
@given(data=mappings | values)
def test_random_recipe_mappings(scratch, data):
    path = write(scratch, ".yaml", yaml.safe_dump(data, allow_unicode=True))
    result = clean(lambda: load_recipe(str(path)))
    assert result is None or isinstance(result, Recipe)


@BOUNDED
@given(cuts=st.lists(st.tuples(st.integers(0, len(TINY_TEXT)), st.integers(0, 8), st.text(max_size=4)), min_size=1, max_size=4))
def test_mutated_recipe_text(scratch, cuts):
    text = TINY_TEXT
    for at, drop, insert in cuts:
        text = text[:at] + insert + text[at + drop:]
    path = write(scratch, ".yaml", text)
    result = clean(lambda: load_recipe(str(path)))
    assert result is None or isinstance(result, Recipe)


@BOUNDED
@given(overrides=st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks] + ["name", "seed", "x.y.z", "", "."]), st.text(max_size=12)),
    max_size=3))
def test_set_strings(overrides):
    result = clean(lambda: load_recipe("tiny-gemma2-dolly", overrides))
    assert result is None or isinstance(result, Recipe)


@BOUNDED
@given(changes=st.dictionaries(st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]), values, max_size=3))
def test_with_overrides(changes):
    base = load_recipe("tiny-gemma2-dolly")
    result = clean(lambda: with_overrides(base, changes))
    assert result is None or isinstance(result, Recipe)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(source="preset:tiny-gemma2"))


@pytest.fixture(scope="module", autouse=True)
def private_datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """Fuzzed files must not fill the user's datasets cache."""
    import datasets

    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets-cache"))
    yield
    patch.undo()


columns = st.sampled_from(["instruction", "response", "context", "category", "text", "output"]) | st.text(max_size=6)
cells = st.one_of(st.none(), st.text(max_size=40), st.integers(), st.floats(allow_nan=False), st.booleans(),
                  st.lists(st.integers(), max_size=2))
rows = st.lists(st.dictionaries(columns, cells, max_size=4), max_size=6)
data_configs = st.fixed_dictionaries({
    "columns": st.dictionaries(st.sampled_from(["instruction", "response", "context"]), columns, max_size=2),
    "max_length": st.integers(1, 96),
    "eval_fraction": st.sampled_from([0.0, 0.3, 0.9]),
})


def build(tokenizer, path: Path, config: dict) -> None:
    cfg = DataConfig(source=str(path), **config)
    result = clean(lambda: build_instruction_data(cfg, tokenizer, seed=0))
    if result is not None:
        assert isinstance(result, InstructionData) and len(result.train) > 0
        for labels in result.train["labels"]:
            assert len(labels) <= cfg.max_length and any(x != -100 for x in labels)


@DATA_BOUNDED
@given(records=rows, config=data_configs, torn=st.booleans())
def test_random_jsonl_files(scratch, tokenizer, records, config, torn):
    text = "".join(json.dumps(r) + "\n" for r in records)
    build(tokenizer, write(scratch, ".jsonl", text[: len(text) // 2] if torn else text), config)


@DATA_BOUNDED
@given(records=rows, config=data_configs, junk=st.text(max_size=20))
def test_random_csv_files(scratch, tokenizer, records, config, junk):
    out = io.StringIO()
    header = sorted({k for r in records for k in r})
    writer = csv.DictWriter(out, fieldnames=header)
    if header:
        writer.writeheader()
        writer.writerows(records)
    build(tokenizer, write(scratch, ".csv", out.getvalue() + junk), config)
