"""A GGUF file is converted once into a checkpoint folder under $PEFTLAB_CACHE keyed by its content; later loads
reuse it; a conversion that fails leaves nothing that a later load would take for a whole folder."""

from __future__ import annotations

import os

import pytest

from peftlab.config import ModelConfig
from peftlab.errors import PeftlabError
from peftlab.models import gguf, loader


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))


def fake_converter(calls: list[str]):
    def convert(path, out):
        calls.append(path.name)
        for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
            (out / name).write_text("{}")
        (out / "tokenizer.json").write_text(path.read_text())

    return convert


def test_the_second_load_hits_the_cache(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_text("weights v1")
    calls: list[str] = []
    first = gguf.converted(model, fake_converter(calls))
    second = gguf.converted(model, fake_converter(calls))
    assert first == second and calls == ["m.gguf"]
    assert first.parent == gguf.cache_root() / "gguf" and (first / "tokenizer.json").read_text() == "weights v1"
    assert [p.name for p in first.parent.iterdir() if p.is_dir() and p.name.startswith(".")] == []  # no temporary folder left (the lock file stays)


def test_a_changed_file_is_converted_again(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_text("weights v1")
    calls: list[str] = []
    first = gguf.converted(model, fake_converter(calls))
    model.write_text("weights v2")
    os.utime(model, ns=(1, 1))  # whatever the clock: the key is the content
    second = gguf.converted(model, fake_converter(calls))
    assert first != second and len(calls) == 2 and (second / "tokenizer.json").read_text() == "weights v2"


def test_a_failed_conversion_leaves_no_folder_and_is_retried(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_text("weights")

    def crash(path, out):
        (out / "tokenizer.json").write_text("half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        gguf.converted(model, crash)
    assert not gguf.cache_folder(model).exists()
    assert [p for p in gguf.cache_folder(model).parent.iterdir() if p.is_dir()] == []  # the lock file stays
    calls: list[str] = []
    assert (gguf.converted(model, fake_converter(calls)) / "config.json").is_file() and calls == ["m.gguf"]


def test_a_gguf_source_loads_from_the_converted_folder(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_text("weights")
    calls: list[str] = []
    real = gguf.converted
    monkeypatch.setattr(gguf, "converted", lambda path: real(path, fake_converter(calls)))
    for _ in range(2):
        location, kwargs = loader._location(ModelConfig(source=str(model)), None)
        assert location == str(gguf.cache_folder(model)) and "gguf_file" not in kwargs
    assert calls == ["m.gguf"]


def test_a_conversion_without_weights_is_an_error_not_a_cache_entry(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_text("weights v1")

    def no_weights(path, out):
        (out / "config.json").write_text("{}")
        (out / "tokenizer_config.json").write_text("{}")

    with pytest.raises(PeftlabError, match=r"\*\.safetensors"):
        gguf.converted(model, no_weights)
    assert not gguf.cache_folder(model).exists()


def test_the_gguf_readers_own_bar_is_off_while_converting_then_back(capsys):
    # it ignores transformers' disable_progress_bar: the demo's piped stderr held its carriage-return bar
    from transformers import modeling_gguf_pytorch_utils as reader

    def draw() -> str:
        list(reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        return capsys.readouterr().err

    with gguf.quiet_gguf_reader():
        assert draw() == ""
    assert "Converting and de-quantizing" in draw()
