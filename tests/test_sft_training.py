"""One real epoch on the tiny twin, shared by the tests of this module: what the trainer consumed, the loss curve,
summary vs metrics.jsonl, the saved adapter and `peftlab generate`."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, run_main

from peftlab.config import load_recipe, with_overrides
from peftlab.data.instructions import IGNORE_INDEX
from peftlab.engines.hf import CountingSFTTrainer
from peftlab.runner import run_recipe
from peftlab.tasks import sft

BATCH = 2


@pytest.fixture(scope="module")
def epoch(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Exactly one epoch (no max_steps), every step logged, with the consumed micro-batches and the model recorded."""
    recipe = with_overrides(load_recipe("tiny-gemma2-dolly"), {
        **FAST, "data.max_samples": 72, "data.max_length": 384, "train.max_steps": None, "train.epochs": 1,
        "train.batch_size": BATCH, "train.logging_steps": 1, "eval.max_new_tokens": 8,
    })
    seen = SimpleNamespace(batches=[], setup=None)
    build, training_step = sft.build, CountingSFTTrainer.training_step

    def spy_build(*args, **kwargs):
        seen.setup = build(*args, **kwargs)
        return seen.setup

    def spy_step(self, model, inputs, num_items_in_batch=None):
        seen.batches.append({k: inputs[k].detach().clone() for k in ("input_ids", "labels", "attention_mask")})
        return training_step(self, model, inputs, num_items_in_batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "build", spy_build)
        mp.setattr(CountingSFTTrainer, "training_step", spy_step)
        run = run_recipe(recipe, tmp_path_factory.mktemp("runs"), "epoch", show_progress=False)
    train = seen.setup.data.train
    return SimpleNamespace(run=run, recipe=recipe, batches=seen.batches, setup=seen.setup, train=train,
                           summary=run.summary(), records=[r for r in run.metrics() if r["kind"] == "train"])


def test_consumed_batches_are_the_masked_train_split(epoch):
    pad = epoch.setup.tokenizer.pad_token_id
    consumed = Counter()
    for batch in epoch.batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()  # right padding
            assert (ids[n:] == pad).all() and (labels[n:] == IGNORE_INDEX).all()
            consumed[(tuple(ids[:n].tolist()), tuple(labels[:n].tolist()))] += 1
    expected = Counter(zip(map(tuple, epoch.train["input_ids"]), map(tuple, epoch.train["labels"]), strict=True))
    # Every train example exactly once, with its exact -100 prompt mask (nothing re-tokenized or re-masked).
    assert consumed == expected


def test_loss_decreases(epoch):
    losses = [r["loss"] for r in epoch.records]
    assert len(losses) >= 25 and all(math.isfinite(x) and x > 0 for x in losses)
    third = len(losses) // 3  # per-step losses of 2-row batches are noisy: compare the first and last thirds
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    assert last < first - 0.5, f"loss did not decrease: first {first:.3f}, last {last:.3f}"


def test_summary_agrees_with_metrics_and_data(epoch):
    s, last, train = epoch.summary, epoch.records[-1], epoch.train
    assert s["status"] == "completed"
    assert s["steps"] == last["step"] == math.ceil(len(train) / BATCH) == len(epoch.batches)
    assert s["epochs"] == pytest.approx(1.0)
    # Real (non-padding) tokens: the sum of the consumed examples' lengths, not padded batch sizes.
    assert s["tokens"] == last["tokens"] == sum(len(ids) for ids in train["input_ids"])
    assert s["padded_tokens"] == sum(b["input_ids"].numel() for b in epoch.batches) > s["tokens"]
    assert s["samples"] == last["samples"] == len(train)
    assert s["trained_tokens"] == sum(sum(x != IGNORE_INDEX for x in labels[1:]) for labels in train["labels"])
    assert s["final_train_loss"] == last["loss"]
    for rate, total in (("steps_per_s", "steps"), ("samples_per_s", "samples"), ("tokens_per_s", "tokens")):
        assert s[rate] == pytest.approx(s[total] / s["runtime_s"], rel=0.01)
    times = [r["time"] for r in epoch.records]
    assert times == sorted(times) and times[-1] <= s["runtime_s"]
    assert [r["step"] for r in epoch.records] == list(range(1, s["steps"] + 1))
    assert s["perplexity"] == pytest.approx(math.exp(s["eval_loss"]))
    assert s["data"]["train_rows"] == len(train)


def test_saved_adapter_reloads_with_the_same_logits(epoch):
    assert (epoch.run.adapter_path / "adapter_model.safetensors").is_file()
    reloaded, tokenizer = sft.load_for_inference(epoch.run, epoch.recipe)
    trained = epoch.setup.model
    ids = torch.tensor([epoch.train[0]["input_ids"]])
    assert tokenizer(epoch.setup.tokenizer.decode(ids[0]))["input_ids"] == ids[0].tolist()
    trained.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        with trained.disable_adapter():
            base = trained(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter did change the model


def test_reloaded_adapter_generates_like_the_trained_model(epoch):
    prompt = FAST["eval.prompts"][0]
    saved = json.loads((epoch.run.samples_path / "generations.jsonl").read_text().splitlines()[0])
    model, tokenizer = sft.load_for_inference(epoch.run, epoch.recipe)
    assert saved["prompt"] == prompt
    assert sft.generate(model, tokenizer, prompt, epoch.recipe) == saved["adapter"]


def test_generate_cli_prints_the_adapter_answer(epoch, monkeypatch, capsys):
    prompt = FAST["eval.prompts"][0]
    saved = json.loads((epoch.run.samples_path / "generations.jsonl").read_text().splitlines()[0])
    code, out, err = run_main(monkeypatch, capsys, "generate", str(epoch.run.path), "--prompt", prompt)
    lines = [line for line in out.splitlines() if line.strip()]  # stdout: the answers alone (progress: stderr)
    assert code == 0 and "generating: done in" in err
    assert lines[0] == f"> {prompt}"
    # The tiny model may answer in whitespace only (the console drops blank lines): compare the words.
    assert " ".join(lines[1:]).split() == saved["adapter"].split()
