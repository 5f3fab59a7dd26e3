"""The health guard stops broken runs within the first logging steps, with status failed and a diagnosis."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftlab.data.instructions import encode, load_records
from peftlab.engines.hf import sft_config
from peftlab.errors import GuardFailure
from peftlab.models.loader import load_tokenizer
from peftlab.runner import run_recipe
from peftlab.runs import RunDir
from peftlab.tasks import sft
from peftlab.watch.guard import HealthGuard, RunContext, check_batch_labels

CONTEXT = RunContext(model_type="gemma2", precision="bf16", attn_implementation="eager", lr=2e-4, method="qlora")


@pytest.mark.parametrize("logs, problem", [
    ({"loss": 0.0, "grad_norm": 0.0}, "exactly 0.0"),
    ({"loss": float("nan"), "grad_norm": 1.0}, "loss is nan"),
    ({"loss": float("inf")}, "loss is inf"),
    ({"loss": 2.3, "grad_norm": float("nan")}, "grad_norm is nan"),
])
def test_guard_refuses_the_original_failure_logs(logs, problem):
    with pytest.raises(GuardFailure, match=problem) as info:
        HealthGuard(CONTEXT).check_log(10, logs)
    assert str(info.value).startswith("step 10:") and "probable causes" in str(info.value)


def test_guard_passes_healthy_logs_and_counts_patience():
    guard = HealthGuard(CONTEXT, patience=2)
    guard.check_log(1, {"loss": 2.31, "grad_norm": 0.7})
    guard.check_log(2, {"loss": 0.0})  # one bad window is tolerated with patience 2 ...
    guard.check_log(3, {"loss": 2.2, "grad_norm": 0.6})  # ... and a healthy one resets the count
    guard.check_log(4, {"loss": 0.0})
    with pytest.raises(GuardFailure, match="step 5"):
        guard.check_log(5, {"loss": float("nan")})


def test_all_masked_batch_is_refused():
    check_batch_labels(1, step=0)
    with pytest.raises(GuardFailure, match="no unmasked label tokens"):
        check_batch_labels(0, step=3)


def test_trainer_logs_raw_losses(tiny_recipe, tmp_path):
    # HF's default logging_nan_inf_filter=True is what turned the original NaN losses into "loss 0.0".
    recipe = tiny_recipe()
    args = sft_config(recipe.train, recipe.seed, tmp_path, "fp32", recipe.data.max_length)
    assert args.logging_nan_inf_filter is False


def test_all_masked_data_fails_the_cli_run_with_exit_3(tmp_path, fast_sets, tiny_recipe):
    # max_length above the bare template (a bad-input error of its own) but no longer than any real prompt.
    recipe = tiny_recipe()
    tokenizer = load_tokenizer(recipe.model)
    shortest = min(encode(row, tokenizer, recipe.data)["prompt_tokens"] for row in load_records(recipe.data, recipe.seed))
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "train", "tiny-gemma2-dolly", *fast_sets, "--set", f"data.max_length={shortest}",
         "--runs-dir", str(runs), "--name", "masked"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.max_length" in errors[0]
    summary = json.loads((runs / "masked" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == "health guard"
    assert f"data.max_length={shortest}" in summary["diagnosis"] and "fix:" in summary["diagnosis"]


def test_planted_nan_stops_within_the_first_logging_steps(tiny_recipe, runs_dir, monkeypatch):
    recipe = tiny_recipe({"train.max_steps": 30, "train.logging_steps": 2})
    build = sft.build

    def poisoned(*args, **kwargs):
        setup = build(*args, **kwargs)
        lora_a = next(p for name, p in setup.model.named_parameters() if "lora_A" in name)
        with torch.no_grad():
            lora_a.fill_(float("nan"))
        return setup

    monkeypatch.setattr(sft, "build", poisoned)
    with pytest.raises(GuardFailure):
        run_recipe(recipe, runs_dir, "nan", show_progress=False)
    run = RunDir(runs_dir / "nan")
    summary, records = run.summary(), [r for r in run.metrics() if r["kind"] == "train"]
    assert summary["status"] == "failed" and summary["reason"] == "health guard"
    assert "nan" in summary["diagnosis"]
    stopped_at = int(summary["diagnosis"].split(":")[0].removeprefix("step "))
    assert stopped_at == records[-1]["step"] <= 2 * recipe.train.logging_steps
    assert records[-1]["loss"] == "nan"  # metrics.jsonl keeps the raw value (as a string: JSON has no NaN)
    assert not (run.adapter_path / "adapter_model.safetensors").exists()
