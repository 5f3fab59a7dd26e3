"""The loss sees exactly the response tokens + EOS of real Dolly rows; prompts are -100, truncation keeps the start."""

from __future__ import annotations

import pytest

from peftlab.config import ModelConfig, load_recipe, with_overrides
from peftlab.data.instructions import IGNORE_INDEX, build_instruction_data, encode, load_records, render_prompt
from peftlab.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(source="preset:tiny-gemma2"))


@pytest.fixture(scope="module")
def data_cfg():
    return with_overrides(load_recipe("tiny-gemma2-dolly"), {"data.max_length": 4096}).data


@pytest.fixture(scope="module")
def rows(data_cfg):
    return list(load_records(data_cfg.model_copy(update={"max_samples": 60}), seed=42))


def test_records_are_shuffled_across_categories(rows):
    # The bundled file is grouped by category: unshuffled, the first rows would all share one.
    assert len({r["category"] for r in rows}) >= 4
    assert any(r["context"] for r in rows) and any(not r["context"] for r in rows)


def test_labels_are_exactly_response_tokens_plus_eos(rows, tokenizer, data_cfg):
    for row in rows:
        example = encode(row, tokenizer, data_cfg)
        ids, labels = example["input_ids"], example["labels"]
        prompt_ids = tokenizer(render_prompt(row, data_cfg))["input_ids"]
        response_ids = tokenizer(row["response"].strip(), add_special_tokens=False)["input_ids"]
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        # Every prompt token masked, every response token trained: the trained positions are one tail block.
        assert trained == list(range(len(prompt_ids), len(ids)))
        assert ids[: len(prompt_ids)] == prompt_ids
        assert [labels[i] for i in trained] == response_ids + [tokenizer.eos_token_id]
        # Labels are the input ids themselves (the model shifts), never pre-shifted.
        assert [ids[i] for i in trained] == [labels[i] for i in trained]
        assert tokenizer.decode(ids[: len(prompt_ids)]) == render_prompt(row, data_cfg)
        assert tokenizer.decode([labels[i] for i in trained[:-1]]) == row["response"].strip()


def test_truncation_keeps_the_start(rows, tokenizer, data_cfg):
    full = [encode(row, tokenizer, data_cfg) for row in rows]
    long_row, whole = next((r, e) for r, e in zip(rows, full, strict=True) if len(e["input_ids"]) > 80)
    cut = encode(long_row, tokenizer, data_cfg.model_copy(update={"max_length": 48}))
    assert cut["input_ids"] == whole["input_ids"][:48]
    assert cut["labels"] == whole["labels"][:48]
    assert cut["full_tokens"] == len(whole["input_ids"])


def test_built_splits_are_seeded_disjoint_and_never_fully_masked(tokenizer, tiny_recipe):
    cfg = tiny_recipe({"data.max_length": 96, "data.max_samples": 80}).data
    data = build_instruction_data(cfg, tokenizer, seed=42)
    again = build_instruction_data(cfg, tokenizer, seed=42)
    other = build_instruction_data(cfg, tokenizer, seed=7)
    assert data.train["input_ids"] == again.train["input_ids"]
    assert data.eval["input_ids"] != other.eval["input_ids"]
    train_rows = {tuple(ids) for ids in data.train["input_ids"]}
    assert not train_rows & {tuple(ids) for ids in data.eval["input_ids"]}
    for split in (data.train, data.eval):
        for ids, labels in zip(split["input_ids"], split["labels"], strict=True):
            assert len(ids) == len(labels) <= 96
            assert any(label != IGNORE_INDEX for label in labels)
    stats = data.stats
    assert stats.train_rows + stats.eval_rows + stats.dropped_fully_masked == stats.rows == 80
    assert stats.dropped_fully_masked > 0  # some Dolly prompts alone exceed 96 tokens: dropped, not trained on
