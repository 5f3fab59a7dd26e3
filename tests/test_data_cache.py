"""A second run of a recipe reuses its tokenized rows from datasets' cache; anything encode() reads changes the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.config import ModelConfig, load_recipe, with_overrides
from peftlab.data import instructions
from peftlab.data.fingerprint import tokenizer_digest
from peftlab.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(source="preset:tiny-gemma2"))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows encode() tokenized (a cache hit tokenizes none)."""
    calls = [0]
    real = instructions.encode

    def encode(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(instructions, "encode", encode)
    return calls


def _cfg(tmp_path: Path, **changes):
    # A file of its own: datasets keys the table by the file's path and modification time.
    path = tmp_path / "rows.jsonl"
    if not path.exists():
        rows = [{"instruction": f"Say {i} twice.", "context": "", "response": f"{i} {i}", "category": "x"}
                for i in range(30)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe("tiny-gemma2-dolly")
    return with_overrides(recipe, {"data.source": str(path), "data.eval_fraction": 0.1, "data.max_length": 64,
                                   **changes}).data


def test_a_second_build_reuses_the_rows(tmp_path, tokenizer, counted, capsys) -> None:
    first = instructions.build_instruction_data(_cfg(tmp_path), tokenizer, seed=1)
    assert counted[0] == 30
    capsys.readouterr()
    second = instructions.build_instruction_data(_cfg(tmp_path), tokenizer, seed=1)
    assert counted[0] == 30  # nothing tokenized again
    assert second.train.to_list() == first.train.to_list() and second.eval.to_list() == first.eval.to_list()
    assert second.stats == first.stats
    done = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenizing: done")]
    assert len(done) == 1 and done[0].endswith("(30/30)"), done  # the hit still reports every row


@pytest.mark.parametrize("change", [{"data.max_length": 26}, {"data.template": "Q: {instruction}\nA: "}])
def test_what_encode_reads_is_in_the_key(tmp_path, tokenizer, counted, change) -> None:
    before = instructions.build_instruction_data(_cfg(tmp_path), tokenizer, seed=1)
    cfg = _cfg(tmp_path, **change)
    changed = instructions.build_instruction_data(cfg, tokenizer, seed=1)
    assert counted[0] == 60  # tokenized again, not read from the first build's cache
    fresh = {tuple(instructions.encode(r, tokenizer, cfg)["input_ids"]) for r in instructions.load_records(cfg, 1)}
    rows = {tuple(r["input_ids"]) for r in changed.train}
    assert rows <= fresh and rows != {tuple(r["input_ids"]) for r in before.train}


def test_a_changed_file_is_tokenized_again(tmp_path, tokenizer, counted) -> None:
    instructions.build_instruction_data(_cfg(tmp_path), tokenizer, seed=1)
    path = tmp_path / "rows.jsonl"
    path.write_text(path.read_text().replace("twice", "three times"))
    again = instructions.build_instruction_data(_cfg(tmp_path), tokenizer, seed=1)
    assert counted[0] == 60
    assert all("three" in tokenizer.decode(r["input_ids"]) for r in again.train)


def test_the_tokenizer_digest_tells_tokenizers_apart(tokenizer) -> None:
    again = load_tokenizer(ModelConfig(source="preset:tiny-gemma2"))
    gpt2 = load_tokenizer(ModelConfig(source="preset:tiny-gpt2"))
    assert tokenizer_digest(tokenizer) == tokenizer_digest(again) != tokenizer_digest(gpt2)
