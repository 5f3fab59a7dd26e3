"""FastTrainer, the engine's one-call surface: it trains a task's model through the skeleton's hooks, reports its
plan, and resumes step-exactly (same data order, optimizer, schedule and dropout RNG) from a checkpoint."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from peftlab.engines.fast.trainer import FastTrainer, unsupported
from peftlab.tasks import sft


class Hooks:
    """StepHooks that log every step, and keep a checkpoint (adapter weights + engine state) at `save_at`."""

    def __init__(self, trainer: FastTrainer, save_at: int | None = None) -> None:
        self.trainer, self.save_at = trainer, save_at
        self.losses: dict[int, float] = {}
        self.micro_batches = 0
        self.checkpoint = None

    def on_micro_batch(self, batch) -> None:
        self.micro_batches += 1

    def on_log(self, record) -> None:
        self.losses[record["step"]] = record["loss"]

    def on_step_end(self, step: int) -> bool:
        if step == self.save_at:
            weights = {n: p.detach().clone() for n, p in self.trainer.model.trainable_parameters()}
            self.checkpoint = (weights, copy.deepcopy(self.trainer.state_dict(step)))
            return True  # an interrupt right after the checkpoint
        return False


def setup_for(tiny_recipe):
    recipe = tiny_recipe({"data.max_samples": 60, "data.eval_fraction": 0.0, "data.max_length": 64,
                          "train.max_steps": 4, "train.logging_steps": 1, "train.batch_size": 2,
                          "train.grad_accum": 2})  # LoRA dropout stays on (0.05): resume must restore the RNG
    setup = sft.build(recipe)
    return recipe, setup, FastTrainer(setup.model, "sft", recipe.train, "fp32", recipe.data.max_length)


def fit(trainer, setup, recipe, hooks, resume=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.fit(setup.data.train, recipe.seed, hooks, resume)


def test_fit_trains_through_the_hooks_and_reports_its_plan(tiny_recipe):
    recipe, setup, trainer = setup_for(tiny_recipe)
    before = {n: p.detach().clone() for n, p in trainer.model.trainable_parameters()}
    hooks = Hooks(trainer)
    report = fit(trainer, setup, recipe, hooks)
    assert report.steps == 4 and not report.stopped and sorted(hooks.losses) == [1, 2, 3, 4]
    assert report.plan.budget >= recipe.data.max_length and hooks.micro_batches >= 4
    assert report.tokens > 0 and report.first_step_s is not None
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.trainable_parameters())
    assert setup.model.config._attn_implementation == "eager"  # the model's own attention is given back
    assert "tokens per micro-batch" in report.as_summary()["plan_text"]


def test_resume_is_step_exact(tiny_recipe):
    recipe, setup, trainer = setup_for(tiny_recipe)
    straight = Hooks(trainer)
    initial = {n: p.detach().clone() for n, p in trainer.model.trainable_parameters()}
    torch.manual_seed(7)
    fit(trainer, setup, recipe, straight)

    with torch.no_grad():  # the same starting point again, interrupted after step 2
        for n, p in trainer.model.trainable_parameters():
            p.copy_(initial[n])
    trainer = FastTrainer(setup.model, "sft", recipe.train, "fp32", recipe.data.max_length)
    interrupted = Hooks(trainer, save_at=2)
    torch.manual_seed(7)
    report = fit(trainer, setup, recipe, interrupted)
    assert report.stopped and report.steps == 2

    weights, state = interrupted.checkpoint
    with torch.no_grad():
        for n, p in trainer.model.trainable_parameters():
            p.copy_(weights[n])
    torch.manual_seed(12345)  # whatever the RNG is now, the checkpoint's is restored
    trainer = FastTrainer(setup.model, "sft", recipe.train, "fp32", recipe.data.max_length)
    resumed = Hooks(trainer)
    report = fit(trainer, setup, recipe, resumed, resume=state)
    assert report.steps == 4 and sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[s] for s in (3, 4)] == [straight.losses[s] for s in (3, 4)]
    assert [interrupted.losses[s] for s in (1, 2)] == [straight.losses[s] for s in (1, 2)]


def test_unsupported_says_why():
    assert unsupported("gemma2", "sft", "bf16", "lora") is None
    assert "diffusion" in unsupported("gemma2", "diffusion", "bf16", "lora")
    assert "llama" in unsupported("llama", "sft", "bf16", "lora")
    assert "fp16" in unsupported("gpt2", "classify", "fp16", "lora")
    assert unsupported("gpt2", "classify", "bf16", "qlora") is None  # a bitsandbytes 4-bit base, same packed path
    assert "8-bit" in unsupported("gemma2", "sft", "bf16", "8-bit LoRA")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_clock_keeps_compiling_steps_and_hook_work_out_of_the_steady_state(monkeypatch):
    """First sight of a micro-batch shape = a compile (first step, a new budget later); an evaluation in a hook is
    neither. A fake clock: steps 1 and 3 compile (5 s, 4 s), steps 2 and 4 take 1 s, a 3 s evaluation after step 2."""
    from types import SimpleNamespace

    from peftlab.engines.fast.trainer import _StepClock

    clock = FakeClock()
    monkeypatch.setattr("peftlab.engines.fast.trainer.time.perf_counter", clock)

    class Inner:
        def on_micro_batch(self, batch) -> None:
            pass

        def on_step_end(self, step: int) -> bool:
            clock.now += 3.0 if step == 2 else 0.0
            return False

    timer = _StepClock(Inner(), compiled=True)
    for step, (budget, seconds) in enumerate([(256, 5.0), (256, 1.0), (512, 4.0), (256, 1.0)], start=1):
        timer.on_micro_batch(SimpleNamespace(budget=budget, tokens=100 * step, sum_sq=step))
        clock.now += seconds
        timer.on_step_end(step)
    assert timer.compile_s == 9.0 and timer.steady_s == 2.0 and timer.first_step_s == 5.0
    assert (timer.tokens, timer.steady_tokens, timer.steady_sq) == (1000, 600, 6)

    eager = _StepClock(Inner(), compiled=False)  # the CPU compiles nothing: every step is steady
    eager.on_micro_batch(SimpleNamespace(budget=256, tokens=7, sum_sq=49))
    clock.now += 2.0
    eager.on_step_end(1)
    assert eager.compile_s == 0.0 and eager.steady_s == 2.0 and eager.steady_tokens == 7


def test_mfu_is_per_gpu_over_every_process_flops(monkeypatch):
    """Under N processes the report holds every rank's FLOPs over the slowest rank's seconds; MFU divides by N GPUs'
    peak, so two GPUs each at their peak read 100%, not 200%."""
    from peftlab.engines.fast.flops import PEAK_FLOPS
    from peftlab.engines.fast.planner import Plan
    from peftlab.engines.fast.trainer import FastReport

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = Plan(2048, False, None, (), None, 8.0, 0.1, False, ())

    def report(processes: int) -> FastReport:
        return FastReport(plan, 10, False, 1.0, 3.0, None, None, False, 4096, 6 * PEAK_FLOPS, 4096, 2 * PEAK_FLOPS,
                          2.0, processes)

    assert report(1).as_summary()["mfu"] == 1.0 and report(2).as_summary()["mfu"] == 0.5
    assert report(2).as_summary()["steady_tokens_per_s"] == 2048  # every process's tokens


def test_two_processes_take_the_steps_of_one_process_with_their_batch(tiny_recipe, tmp_path):
    """Data parallel (torchrun, 2 gloo processes): batch 2 x accumulation 2 per process = the optimizer steps of one
    process at batch 4 x accumulation 2 (same rows, same normalisation over the step's trained tokens): the same
    step losses and weights, up to fp32 summation order (1e-5), with each process packing half of every step."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    changes = {"data.max_samples": 60, "data.eval_fraction": 0.0, "data.max_length": 64, "train.max_steps": 4,
               "train.logging_steps": 1, "train.grad_accum": 2, "method.lora.dropout": 0.0}
    (tmp_path / "recipe.yaml").write_text(json.dumps(tiny_recipe({**changes, "train.batch_size": 2}).to_dict()))
    worker = Path(__file__).with_name("fast_ddp_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path / "recipe.yaml"), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    recipe = tiny_recipe({**changes, "train.batch_size": 4})
    setup = sft.build(recipe)
    trainer = FastTrainer(setup.model, "sft", recipe.train, "fp32", recipe.data.max_length)
    hooks = Hooks(trainer)
    fit(trainer, setup, recipe, hooks)
    assert ddp["steps"] == 4 and sorted(ddp["losses"]) == [1, 2, 3, 4]
    assert [ddp["losses"][s] for s in (1, 2, 3, 4)] == pytest.approx([hooks.losses[s] for s in (1, 2, 3, 4)], rel=1e-5)
    assert 0 < ddp["own_tokens"] < ddp["tokens"]  # each process packed a part of every step
    assert ddp["losses"][4] != ddp["losses"][1]  # it trained: equal weights are not two untouched copies
    # Weights per tensor, as a relative norm: Adam divides each update by the gradient's running RMS, so where a
    # gradient is near zero a rounding-level difference moves that one element by up to ~lr (measured: one of
    # 1,024 elements off by 7e-5, the others within 1e-6); a wrong normalisation moves every element.
    for name, p in trainer.model.trainable_parameters():
        assert torch.linalg.norm(ddp["weights"][name] - p.detach()) <= 1e-3 * torch.linalg.norm(p.detach()), name
