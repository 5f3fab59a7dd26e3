"""`train.engine: fast` through the seam: a tiny twin trains, evaluates and saves its adapter through the same
skeleton as the hf engine; it checkpoints and resumes step-exactly; auto keeps hf on the CPU."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest

from peftlab.config import load_recipe, with_overrides
from peftlab.engines import TrainJob, resolve_engine
from peftlab.engines.hooks import TrainingHooks
from peftlab.reliability import TrainingInterrupted
from peftlab.runner import resume_run, run_recipe
from peftlab.runs import RunDir


def recipe_for(changes=None):
    return with_overrides(load_recipe("tiny-gemma2-dolly"), {
        "data.max_samples": 60, "data.eval_fraction": 0.1, "data.max_length": 64, "train.max_steps": 4,
        "train.logging_steps": 1, "train.batch_size": 2, "train.grad_accum": 2, "train.engine": "fast",
        "eval.prompts": ["Name a primary color."], "eval.max_new_tokens": 4, "eval.compare_base": False,
        **(changes or {})})


def train_losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.metrics() if r.get("kind") == "train"}


def test_fast_engine_trains_evaluates_and_saves_through_the_skeleton(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_recipe(recipe_for({"train.eval_steps": 2}), tmp_path, "fast", show_progress=False)
    summary = run.summary()
    assert summary["status"] == "completed" and summary["engine"] == "fast" and summary["steps"] == 4
    assert sorted(train_losses(run)) == [1, 2, 3, 4]
    assert [r["step"] for r in run.metrics() if r.get("kind") == "eval"] == [2, 4]  # eval_steps, by the hf Trainer
    assert summary["eval_loss"] > 0 and "tokens per micro-batch" in summary["plan_text"]
    assert summary["tokens"] > 0 and summary["samples"] == 16  # 4 steps x 2 x 2 rows, counted per document
    budget = summary["plan"]["budget"]  # padded tokens: whole packed rows, their trailing padding included
    assert summary["padded_tokens"] > summary["tokens"] and summary["padded_tokens"] % budget == 0
    assert summary["compile_s"] is None and summary["steady_tokens_per_s"] > 0  # the CPU compiles nothing
    assert (run.adapter_path / "adapter_model.safetensors").is_file()


def test_fast_engine_stops_on_sigint_with_a_checkpoint_and_resumes_step_exactly(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = run_recipe(recipe_for(), tmp_path, "straight", show_progress=False)
        original = TrainingHooks.step_end

        def ctrl_c_at_step_2(self, step):
            original(self, step)
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(TrainingHooks, "step_end", ctrl_c_at_step_2)
        with pytest.raises(TrainingInterrupted):
            run_recipe(recipe_for({"train.save_steps": 3}), tmp_path, "halves", show_progress=False)
        monkeypatch.setattr(TrainingHooks, "step_end", original)
        stopped = RunDir(tmp_path / "halves").summary()
        assert stopped["status"] == "interrupted" and stopped["checkpoint"].endswith("checkpoint-2")
        resumed = resume_run("halves", tmp_path, show_progress=False)
    assert resumed.summary()["status"] == "completed" and resumed.summary()["resumes"][-1]["from_step"] == 2
    trained = [r["step"] for r in resumed.metrics() if r.get("kind") == "train"]
    assert trained.count(1) == 1 and trained[-2:] == [3, 4]  # continued, not restarted
    want, got = train_losses(straight), train_losses(resumed)
    assert [got[s] for s in (1, 2, 3, 4)] == [want[s] for s in (1, 2, 3, 4)]


def test_fast_engine_classifies_with_epoch_records_and_test_metrics(tmp_path):
    recipe = with_overrides(load_recipe("tiny-dialogpt-banking77"), {
        "data.max_samples": 120, "train.epochs": 2, "train.batch_size": 8, "train.grad_accum": 1,
        "train.eval_steps": None, "train.save_steps": None, "train.best_metric": None, "train.engine": "fast"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_recipe(recipe, tmp_path, "classify", show_progress=False)
    summary = run.summary()
    assert summary["status"] == "completed" and summary["engine"] == "fast"
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_f1"] is not None
    assert [r["epoch"] for r in run.metrics() if r.get("kind") == "epoch"] == [1.0, 2.0]
    assert any("attention-probability dropout" in n for n in summary["engine_notes"])
    assert any("preset tokenizer" in n for n in summary["notes"])  # the task's notes stay


def test_auto_keeps_the_hf_reference_on_the_cpu():
    recipe = load_recipe("tiny-gemma2-dolly")
    job = TrainJob(None, None, [], None, "causal_lm", recipe.train, 0, "fp32", Path("checkpoints"), max_length=64)
    assert resolve_engine("auto", job).name == "hf"


def test_under_torchrun_auto_takes_the_fast_engine_on_cuda_with_ddp_and_hf_for_sharding(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) the fast engine is data-parallel: auto picks it on CUDA as in one process;
    --strategy fsdp/zero shard the model, which only the hf engine does (auto takes hf, engine=fast says why)."""
    from types import SimpleNamespace

    import torch

    import peftlab.engines.fast.engine as fast_engine
    from peftlab.engines.fast.engine import FastEngine

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # the run-length weighing (tests/test_fast_choice.py) needs a real model and data; this job has neither
    monkeypatch.setattr(fast_engine, "_auto_weighs", lambda job: None)
    recipe = load_recipe("tiny-gemma2-dolly")
    gemma2 = SimpleNamespace(config=SimpleNamespace(model_type="gemma2"))
    job = TrainJob(gemma2, None, [], None, "causal_lm", recipe.train, 0, "bf16", Path("checkpoints"), max_length=64)
    monkeypatch.setenv("PEFTLAB_STRATEGY", "ddp")
    assert resolve_engine("auto", job).name == "fast"
    monkeypatch.setenv("PEFTLAB_STRATEGY", "fsdp")
    assert "--strategy fsdp" in FastEngine.supports(job)
    assert resolve_engine("auto", job).name == "hf"
