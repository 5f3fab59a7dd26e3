"""Classification data: the bundled Banking77 split, local files with a column mapping, and the label guards."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from peftlab.config import ModelConfig, load_recipe, with_overrides
from peftlab.data.intents import build_class_data
from peftlab.errors import PeftlabError
from peftlab.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(source="preset:tiny-gpt2"))


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("query", "intent")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def local_recipe(train: Path, **changes):
    base = {"data.source": str(train), "data.columns": {"text": "query", "label": "intent"}, "data.classify.test": None,
            "data.classify.max_classes": None, "data.eval_fraction": 0.25}
    return with_overrides(load_recipe("tiny-dialogpt-banking77"), {**base, **changes})


def balanced_rows(labels: str, per_class: int) -> list[tuple[str, str]]:
    return [(f"please help with {label} number {i}", label) for label in labels for i in range(per_class)]


def test_banking77_split_is_the_original_9002_1001_stratified_and_seeded(tokenizer) -> None:
    recipe = with_overrides(load_recipe("tiny-dialogpt-banking77"), {"data.classify.max_classes": None})
    data = build_class_data(recipe.data, tokenizer, seed=42)
    assert (len(data.train), len(data.eval), len(data.test)) == (9002, 1001, 3080)
    assert len(data.labels) == 77 and data.labels[0] == "card_arrival"  # categories.json order fixes the ids
    train, held = Counter(data.train["labels"]), Counter(data.eval["labels"])
    assert set(train) == set(held) == set(range(77))
    for label, n in train.items():  # each class keeps its share of the 10,003 rows in both parts
        assert abs(held[label] - (n + held[label]) * 1001 / 10003) <= 1
    again = build_class_data(recipe.data, tokenizer, seed=42)
    assert list(again.eval["input_ids"]) == list(data.eval["input_ids"])
    other = build_class_data(recipe.data, tokenizer, seed=7)
    assert list(other.eval["input_ids"]) != list(data.eval["input_ids"])


def test_max_classes_keeps_a_few_intent_subset_of_train_and_test(tokenizer) -> None:
    data = build_class_data(load_recipe("tiny-dialogpt-banking77").data, tokenizer, seed=42)
    assert len(data.labels) == 5
    for part in (data.train, data.eval, data.test):
        assert set(part["labels"]) == set(range(5))
    assert data.stats.test_rows == 200 and data.stats.train_rows + data.stats.eval_rows == 737


def test_local_csv_with_a_column_mapping_and_a_test_file(tmp_path: Path, tokenizer) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows("abc", 8))
    test = write_csv(tmp_path / "test.csv", balanced_rows("cab", 2))
    data = build_class_data(local_recipe(train, **{"data.classify.test": str(test)}).data, tokenizer, seed=0)
    assert data.labels == ["a", "b", "c"]  # sorted, as found
    assert (len(data.train), len(data.eval), len(data.test)) == (18, 6, 6)
    assert sorted(Counter(data.eval["labels"]).values()) == [2, 2, 2]
    assert data.train[0]["input_ids"] and set(data.train.column_names) == {"input_ids", "attention_mask", "labels"}


def test_label_column_missing_at_load_names_the_columns_found(tmp_path: Path, tokenizer) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows("ab", 4), header=("query", "category"))
    with pytest.raises(PeftlabError, match=r"column 'intent' \(for label\) not found; columns found: query, category"):
        build_class_data(local_recipe(train).data, tokenizer, seed=0)


def test_labels_outside_the_label_set_are_refused(tmp_path: Path, tokenizer) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows("abz", 4))
    recipe = local_recipe(train, **{"data.classify.labels": ["a", "b"]})
    with pytest.raises(PeftlabError, match=r"4 row\(s\) have labels outside the label set of 2, e.g. 'z'"):
        build_class_data(recipe.data, tokenizer, seed=0)


def test_a_class_without_training_rows_is_refused(tmp_path: Path, tokenizer) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows("ab", 4))
    recipe = local_recipe(train, **{"data.classify.labels": ["a", "b", "c"]})
    with pytest.raises(PeftlabError, match=r"1 class\(es\) of the label set have no training rows, e.g. 'c'"):
        build_class_data(recipe.data, tokenizer, seed=0)


def test_a_single_class_dataset_is_refused(tmp_path: Path, tokenizer) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows("a", 6))
    with pytest.raises(PeftlabError, match="every row has the same label \\('a', 6 rows\\)"):
        build_class_data(local_recipe(train).data, tokenizer, seed=0)


def test_a_class_too_small_to_stratify_says_how_to_fix_it(tmp_path: Path, tokenizer) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows("ab", 4) + [("only one", "c")])
    with pytest.raises(PeftlabError, match="class 'c' has 1 row, too few for a stratified split.*stratify=false"):
        build_class_data(local_recipe(train).data, tokenizer, seed=0)


def test_max_samples_below_the_class_count_names_the_minimum(tmp_path: Path, tokenizer) -> None:
    train = write_csv(tmp_path / "train.csv", balanced_rows("abcde", 4))  # sklearn's "test_size = 3 should be ..."
    with pytest.raises(PeftlabError, match=r"^data.max_samples: 3 rows are fewer than the 5 classes.*; fix: set "
                                           r"data.max_samples to 5 or more"):
        build_class_data(local_recipe(train, **{"data.max_samples": 3}).data, tokenizer, seed=0)


def test_hub_style_integer_labels_are_matched_by_name(tmp_path: Path, tokenizer) -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    # Label ids in a different order than the label set: rows must keep their *names*.
    names = ["b", "a"]
    table = Dataset.from_dict({"text": [f"row {i}" for i in range(8)], "label": [0, 1] * 4},
                              features=Features({"text": Value("string"), "label": ClassLabel(names=names)}))
    path = tmp_path / "train.parquet"
    table.to_parquet(str(path))
    recipe = local_recipe(path, **{"data.columns": {}, "data.classify.labels": ["a", "b"], "data.eval_fraction": 0.5})
    data = build_class_data(recipe.data, tokenizer, seed=0)
    assert data.labels == ["a", "b"]
    texts = tokenizer.batch_decode(list(data.train["input_ids"]) + list(data.eval["input_ids"]))
    labels = list(data.train["labels"]) + list(data.eval["labels"])
    for text, label in zip(texts, labels, strict=True):  # even rows were "b" (id 0 in the file), now id 1
        assert label == (1 if int(text.split()[-1]) % 2 == 0 else 0)


def test_recipe_checks_columns_per_task() -> None:
    with pytest.raises(PeftlabError, match="data.columns: 'instruction' is not a field of task classify; valid: text, label"):
        with_overrides(load_recipe("tiny-dialogpt-banking77"), {"data.columns": {"instruction": "q"}})


def test_fp16_on_a_cpu_is_a_one_line_error() -> None:
    import torch

    from peftlab.models.precision import resolve_precision

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(PeftlabError, match="fp16 mixed precision needs a CUDA GPU"):
        resolve_precision("fp16", "gpt2")


def test_tokenizing_a_cached_table_reports_every_row(tokenizer, capsys) -> None:
    # datasets' cache hit never calls the tokenize function: the demo's second run printed "done in 0s (0/180)"
    recipe = load_recipe("tiny-dialogpt-banking77")
    for _ in range(2):
        capsys.readouterr()
        data = build_class_data(recipe.data, tokenizer, seed=42)
        done = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenizing train: done")]
        assert len(done) == 1 and done[0].endswith(f"({len(data.train)}/{len(data.train)})"), done


def test_accuracy_before_training_is_measured_on_the_runs_own_model_and_leaves_it_as_it_was(tiny_classifier, runs_dir):
    """The demo's "accuracy before" (a Listener's job_ready): argmax accuracy of the job's model as built; its mode and
    the RNG the first step draws from are as they were."""
    import torch

    from peftlab.runs import RunDir
    from peftlab.tasks import classify

    job = classify.prepare(tiny_classifier(), RunDir.create(runs_dir, "acc", tiny_classifier())).job
    with torch.no_grad():  # a zero head scores every class 0: argmax picks label 0 for every row
        for name, param in job.model.named_parameters():
            if ".modules_to_save." in name:
                param.zero_()
    expected = sum(int(row["labels"]) == 0 for row in job.eval_dataset) / len(job.eval_dataset)
    job.model.train()
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    assert classify.accuracy(job) == pytest.approx(expected) and 0 < expected < 1
    assert job.model.training and torch.equal(torch.random.get_rng_state(), state)
