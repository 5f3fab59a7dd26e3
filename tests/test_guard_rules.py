"""The guard stops what is broken and only that: a converged 0.0 runs on, a divergence stops, the diagnosis
names only the causes that apply to this run, and a stopped run keeps its adapter."""

from __future__ import annotations

import math

import pytest

from peftlab.engines.hf import CountingSFTTrainer
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.models.loader import ATTENTION_RULES, attention_implementation
from peftlab.runner import run_recipe
from peftlab.runs import RunDir
from peftlab.watch.guard import Divergence, HealthGuard, RunContext

NAN = {"loss": float("nan"), "grad_norm": float("nan")}


def diagnosis(**context) -> str:
    ctx = {"model_type": "llama", "precision": "bf16", "attn_implementation": "sdpa", "lr": 2e-4, "method": "lora",
           **context}
    with pytest.raises(GuardFailure) as info:
        HealthGuard(RunContext(**ctx)).check_log(5, NAN)
    return str(info.value)


def test_gemma3_sdpa_nan_blames_its_attention_not_softcapping_nor_a_normal_lr():
    # issue 12 item 1: Gemma 3 270M, sdpa, bf16, lr 5e-4 and 5e-5 both NaN from the first step
    for lr in (5e-4, 5e-5):
        text = diagnosis(model_type="gemma3_text", lr=lr)
        assert "sdpa attention on gemma3_text" in text and "model.attn_implementation=eager" in text
        assert "softcapping" not in text and "learning rate" not in text
        assert "fp16" not in text and "4-bit" not in text  # bf16 LoRA


@pytest.mark.parametrize(("context", "named", "not_named"), [
    ({"model_type": "gemma2", "attn_implementation": "eager"}, (), ("attention", "softcapping")),
    ({"model_type": "gemma2", "attn_implementation": "flash_attention_2"}, (), ("softcapping",)),
    ({"model_type": "gpt2", "precision": "fp16"}, ("fp16 overflow",), ("attention", "4-bit", "learning rate")),
    ({"method": "qlora", "precision": "fp16"}, ("fp16 overflow", "4-bit compute dtype fp16"), ()),
    ({"method": "qlora", "compute_dtype": "fp16"}, ("4-bit compute dtype fp16",), ("fp16 overflow",)),
    ({"method": "qlora"}, (), ("4-bit",)),  # compute dtype auto = bf16 here
    ({"lr": 10.0}, ("train.lr=10",), ("attention", "fp16")),
    ({}, ("none of the known ones",), ("attention", "fp16", "4-bit", "learning rate")),
])
def test_diagnosis_names_only_the_causes_that_apply(context, named, not_named):
    text = diagnosis(**context)
    for word in named:
        assert word in text, (word, text)
    for word in not_named:
        assert word not in text, (word, text)


def test_attention_auto_per_family_is_a_table_with_reasons():
    assert attention_implementation("auto", "gemma3_text") == "eager"  # sdpa + bf16 + padding: NaN on real weights
    assert attention_implementation("auto", "gemma3") == "eager"
    assert attention_implementation("auto", "gemma2") == "eager"
    assert attention_implementation("auto", "llama") == "sdpa"
    assert attention_implementation("sdpa", "gemma3_text") == "sdpa"  # asked for explicitly: sdpa + fp32 trains
    with pytest.raises(PeftlabError, match="sdpa is refused for gemma2.*softcapping"):
        attention_implementation("sdpa", "gemma2")
    for family, rule in ATTENTION_RULES.items():
        assert rule.auto in rule.verified and not set(rule.refused) & set(rule.verified) and rule.why, family


def test_a_finite_zero_loss_with_trained_tokens_is_convergence():
    guard = HealthGuard(RunContext("gemma3_text", "bf16", "eager", 2e-3, "lora"))
    for step, loss in enumerate((2.3, 0.0026, 7e-6, 0.0, 0.0, 0.0), 1):  # issue 12 item 2's run
        guard.check_log(step, {"loss": loss, "grad_norm": 1e-6, "trained_tokens": 8})
    with pytest.raises(GuardFailure, match="exactly 0.0 with no trained label token.*masked"):
        guard.check_log(7, {"loss": 0.0, "grad_norm": 0.0, "trained_tokens": 0})
    with pytest.raises(GuardFailure, match="grad_norm is nan"):
        guard.check_log(8, {"loss": 0.0, "grad_norm": float("nan"), "trained_tokens": 8})


def test_divergence_stops_a_climbing_loss_and_not_a_noisy_one():
    # tiny-dialogpt-banking77 at lr=10, logged every step (a CPU run), and a slower climb to the 197
    jump = [1.59, 110.52, 190.37, 342.34, 408.54, 388.83, 300.74, 216.24, 215.37, 313.08]
    climbing = [1.6, 1.5, 1.9, 3.0, 5.2, 9.8, 24.0, 61.0, 120.0, 197.0, 180.0, 210.0]
    for series, stop in ((jump, 6), (climbing, 11)):
        guard = HealthGuard(RunContext("gpt2", "bf16", "sdpa", 10.0, "lora"))
        with pytest.raises(GuardFailure, match=r"^step (\d+): loss diverged.*learning rate too high.*train\.lr=10") as info:
            for step, loss in enumerate(series, 1):
                guard.check_log(step, {"loss": loss, "grad_norm": 3.0})
        assert str(info.value).startswith(f"step {stop}:")

    # diffusion-like noise around 0.1 (single-sample MSE spans 0.01 .. 0.9), and a loss that only falls
    noisy = [0.1, 0.02, 0.9, 0.05, 0.12, 0.6, 0.08, 0.03, 0.7, 0.11, 0.04, 0.5, 0.09] * 8
    for series in (noisy, [17.0 * math.exp(-i / 20) for i in range(200)]):
        quiet = HealthGuard(RunContext("sd-unet", "fp32", "AttnProcessor2_0", 1e-4, "lora"))
        for step, loss in enumerate(series, 1):
            quiet.check_log(step, {"loss": loss, "grad_norm": 1.0})
    off = HealthGuard(RunContext("gpt2", "bf16", "sdpa", 10.0, "lora"), divergence=Divergence(factor=None))
    for step, loss in enumerate(climbing, 1):
        off.check_log(step, {"loss": loss})  # the rule turned off


def test_classify_at_lr_10_fails_instead_of_completing(tiny_classifier, runs_dir):
    recipe = tiny_classifier({"train.lr": 10.0, "train.max_steps": 30, "train.logging_steps": 1,
                              "train.eval_steps": None, "train.save_steps": None, "train.best_metric": None, "train.scheduler": "constant",
                              "train.warmup_ratio": 0.0})
    with pytest.raises(GuardFailure, match="loss diverged"):
        run_recipe(recipe, runs_dir, "lr10", show_progress=False)
    summary = RunDir(runs_dir / "lr10").summary()
    assert summary["status"] == "failed" and summary["reason"] == "health guard"
    assert (runs_dir / "lr10" / "adapter" / "adapter_model.safetensors").is_file()  # saved before stopping


def test_a_zero_loss_run_with_trained_tokens_completes(tiny_recipe, runs_dir, monkeypatch):
    # A loss of exactly 0.0 with finite (zero) gradients and label tokens in every batch, as a memorised set reaches.
    compute_loss = CountingSFTTrainer.compute_loss

    def converged(self, *args, **kwargs):
        result = compute_loss(self, *args, **kwargs)
        return (result[0] * 0.0, *result[1:]) if isinstance(result, tuple) else result * 0.0

    monkeypatch.setattr(CountingSFTTrainer, "compute_loss", converged)
    run = run_recipe(tiny_recipe(), runs_dir, "zero", show_progress=False)
    losses = [r["loss"] for r in run.metrics() if r["kind"] == "train"]
    assert run.summary()["status"] == "completed" and losses and all(loss == 0.0 for loss in losses)
