"""`train.engine: auto` weighs the fast engine's cold compile against the run's length (issue 11): hf for a short
run on a cold compile cache, said in one line; fast with a warm cache or a long run; never weighed on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from peftlab.config import load_recipe, with_overrides
from peftlab.engines import TrainJob, resolve_engine
from peftlab.engines.fast import choice
from peftlab.engines.fast.choice import COLD_COMPILE_S, HF_PARAM_TOKENS_PER_S, weigh_compile

LINE = "the fast engine's cold compile (~145 s) exceeds this run (~{} s); train.engine=fast forces it"


def test_a_short_run_on_a_cold_cache_takes_hf():
    # Gemma 3 270M (271.9M parameters), 100 steps of 16 Dolly rows (~160 tokens): ~71 s on the hf engine
    assert weigh_compile(False, 256_000, 271_900_000) == LINE.format(71)


def test_a_warm_cache_or_a_long_run_takes_fast():
    assert weigh_compile(True, 256_000, 271_900_000) is None  # the compile is a cache load
    assert weigh_compile(False, 2_300_000, 271_900_000) is None  # the recipe's whole epoch: ~640 s on hf
    assert weigh_compile(False, 6_400_000, 2_614_000_000) is None  # gemma2-dolly as shipped: hours on hf


def test_the_threshold_is_the_cold_compile_time():
    parameters = 1_000_000_000
    at = int(COLD_COMPILE_S * HF_PARAM_TOKENS_PER_S / parameters)  # tokens the hf engine trains in COLD_COMPILE_S
    assert weigh_compile(False, at - 1000, parameters) is not None
    assert weigh_compile(False, at + 1000, parameters) is None


def test_run_tokens_is_the_mean_row_times_the_rows_trained():
    rows = [{"input_ids": [1] * n} for n in (10, 20, 30)]
    assert choice.run_tokens(rows, steps=5, rows_per_step=4) == 20 * 5 * 4


@pytest.fixture
def tiny_job(tmp_path):
    from peftlab.tasks import sft

    recipe = with_overrides(load_recipe("tiny-gemma2-dolly"), {
        "data.max_samples": 40, "data.eval_fraction": 0.0, "data.max_length": 64, "train.max_steps": 3,
        "train.batch_size": 2, "train.grad_accum": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = sft.build(recipe)
    return TrainJob(setup.model, setup.tokenizer, setup.data.train, None, "causal_lm", recipe.train, recipe.seed,
                    "fp32", tmp_path / "checkpoints", max_length=64)


def test_auto_says_hf_in_one_line_on_a_cold_cache(tiny_job, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the weighing runs on CUDA only
    assert resolve_engine("auto", tiny_job).name == "hf"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("auto:")]
    assert lines == ["auto: hf, " + LINE.format(0)]


def test_auto_takes_fast_when_the_compile_cache_is_warm(tiny_job, monkeypatch, capsys):
    from peftlab.engines.fast.compile import CompileCache
    from peftlab.engines.fast.trainer import compile_cache_key

    key = compile_cache_key(tiny_job.model, "sft", tiny_job.train, "fp32", 64, tiny_job.train_dataset, tiny_job.seed)
    cache = CompileCache(key)
    cache.folder.mkdir(parents=True)
    cache.path.write_bytes(b"artifacts")
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_engine("auto", tiny_job).name == "fast"
        assert "auto:" not in capsys.readouterr().out
    finally:
        cache.path.unlink()


def test_a_resumed_run_keeps_the_engine_of_its_checkpoints(tiny_job, monkeypatch, capsys):
    from peftlab.engines.fast.engine import ENGINE_STATE

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tiny_job.checkpoints / "checkpoint-2").mkdir(parents=True)
    assert resolve_engine("auto", tiny_job).name == "hf"  # hf's checkpoint (no fast engine state)
    assert "auto: hf, the run's checkpoints are the hf engine's" in capsys.readouterr().out
    (tiny_job.checkpoints / "checkpoint-2" / ENGINE_STATE).write_bytes(b"state")
    assert resolve_engine("auto", tiny_job).name == "fast"  # short, but its checkpoints are the fast engine's


def test_an_explicit_fast_engine_is_never_weighed(tiny_job, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fast = tiny_job.train.model_copy(update={"engine": "fast"})
    tiny_job.train = fast
    assert resolve_engine("fast", tiny_job).name == "fast" and "auto:" not in capsys.readouterr().out


def test_the_cpu_never_weighs(tiny_job, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU")
    assert resolve_engine("auto", tiny_job).name == "hf" and "auto:" not in capsys.readouterr().out


def test_the_choice_asks_for_the_key_the_trainer_loads(tiny_job):
    from peftlab.engines.fast.compile import cache_key
    from peftlab.engines.fast.trainer import FastTrainer, compile_cache_key

    asked = compile_cache_key(tiny_job.model, "sft", tiny_job.train, "fp32", 64, tiny_job.train_dataset, tiny_job.seed)
    trainer = FastTrainer(tiny_job.model, "sft", tiny_job.train, "fp32", 64)
    preferred = trainer.plan(tiny_job.train_dataset, tiny_job.seed, measure=False)  # what compile() keys the cache by
    assert asked == cache_key(trainer.model, preferred.budget, False, preferred.sizes)
