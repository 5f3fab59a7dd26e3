"""SFT data that trains nothing useful is refused before training, and prompts carry exactly one BOS
in training, the doctor and `generate` (issue 12 items 3 and 4)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from peftlab.config import with_overrides
from peftlab.data.instructions import adds_bos, build_instruction_data, encode, prompt_ids, render_prompt
from peftlab.doctor import run_doctor
from peftlab.models import loader, presets
from peftlab.tasks import sft

BOS = "<|endoftext|>"  # the tiny twin's BOS (id 0, inside its 4096-token vocabulary)
TEMPLATE = BOS + "### Instruction:\n{instruction}\n\n### Response:\n"


@pytest.fixture
def bos_tokenizer(tmp_path):
    """The tiny twin's tokenizer made to add BOS itself, as Gemma's and Llama's do."""
    tokenizer = presets.bundled_tokenizer("dolly-bpe4k-tokenizer")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    folder = tmp_path / "bos-tokenizer"
    tokenizer.save_pretrained(folder)
    return folder


def test_a_template_starting_with_bos_gets_one_bos(bos_tokenizer, tiny_recipe):
    recipe = with_overrides(tiny_recipe(), {"model.tokenizer": str(bos_tokenizer), "data.template": TEMPLATE})
    tokenizer = loader.load_tokenizer(recipe.model)
    assert adds_bos(tokenizer) and tokenizer(TEMPLATE)["input_ids"][:2] == [0, 0]  # what the tokenizer alone gives
    row = {"instruction": "Name a color.", "context": "", "response": "Red."}
    ids = encode(row, tokenizer, recipe.data)["input_ids"]
    assert ids[0] == 0 and ids[1] != 0
    plain = with_overrides(recipe, {"data.template": TEMPLATE.removeprefix(BOS)})
    assert ids == encode(row, tokenizer, plain.data)["input_ids"]  # the same as a template without it
    assert prompt_ids(render_prompt(row, recipe.data), tokenizer)[1] != 0

    # generate encodes the prompt the same way: the model sees one BOS
    model = loader.load_causal_lm(recipe.model, torch.float32, "eager")
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                    with_kwargs=True)
    sft.generate(model, tokenizer, "Name a color.", recipe, max_new_tokens=1)
    assert seen[0][:2] != [0, 0] and seen[0][0] == 0


def test_doctor_on_a_bos_template_is_healthy_with_one_bos(bos_tokenizer, tiny_recipe, capsys):
    recipe = with_overrides(tiny_recipe(), {"model.tokenizer": str(bos_tokenizer), "data.template": TEMPLATE})
    assert run_doctor(recipe) == []
    out = capsys.readouterr().out
    assert "prompts start with at most one BOS" in out and BOS * 2 not in out


def write_dolly(path, responses):
    rows = [{"instruction": f"Say item {i}.", "context": "", "response": r} for i, r in enumerate(responses)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_dataset_whose_every_response_is_empty_is_refused(cli, runs_dir, fast_sets, tmp_path, tiny_recipe):
    source = write_dolly(tmp_path / "empty.jsonl", ["", "  ", ""] * 10)
    code, lines = cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", f"data.source={source}",
                      "--runs-dir", str(runs_dir), "--name", "empty")
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0]
    assert "every response (column 'response') is empty" in errors[0] and "fix: point data.columns.response" in errors[0]
    assert not (runs_dir / "empty" / "metrics.jsonl").exists() or not (runs_dir / "empty" / "metrics.jsonl").read_text()
    code, lines = cli("doctor", "tiny-gemma2-dolly", "--set", f"data.source={source}")
    assert code == 2 and lines[-1] == errors[0]


def test_some_empty_responses_are_counted_and_the_doctor_flags_many(tmp_path, tiny_recipe, capsys):
    recipe = with_overrides(tiny_recipe(), {"data.source": str(write_dolly(tmp_path / "half.jsonl", ["Red.", ""] * 20)),
                                            "data.max_samples": None})
    stats = build_instruction_data(recipe.data, loader.load_tokenizer(recipe.model), recipe.seed).stats
    assert stats.empty_responses == 20
    problems = run_doctor(recipe)
    assert any("20/40 responses (50.0%) are empty" in p for p in problems)
