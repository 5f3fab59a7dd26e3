"""Several processes, one run (issue 7), on CPUs: DDP over gloo, and sweep workers sharing one study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import LAUNCH_OPTIONS, without_options
from peftlab.distributed import trainer_strategy_arguments
from peftlab.runs import read_jsonl

# Dropout off: the two layouts draw different dropout masks, and we compare losses step by step.
SETTINGS = ["--set", "train.max_steps=4", "--set", "train.logging_steps=1", "--set", "train.grad_accum=1",
            "--set", "method.lora.dropout=0", "--set", "data.max_samples=64", "--set", 'eval.prompts=["Hi"]',
            "--set", "eval.max_new_tokens=2"]


def peftlab(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def train_losses(run: Path) -> list[tuple[int, float, float, int]]:
    return [(r["step"], r["loss"], r["grad_norm"], r["tokens"]) for r in read_jsonl(run / "metrics.jsonl")
            if r["kind"] == "train"]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    single = peftlab("train", "tiny-gemma2-dolly", *SETTINGS, "--set", "train.batch_size=4",
                     "--runs-dir", str(tmp_path), "--name", "one")
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    ddp = peftlab("train", "tiny-gemma2-dolly", "--gpus", "2", *SETTINGS, "--set", "train.batch_size=2",
                  "--runs-dir", str(tmp_path))
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]

    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2, folders  # one folder for both ranks
    two = next(tmp_path / f for f in folders if f != "one")
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert len(summary["peak_mem_per_rank"]) == 2

    one_losses, two_losses = train_losses(tmp_path / "one"), train_losses(two)
    assert len(one_losses) == len(two_losses) == 4  # logged once, by rank 0
    for (s1, l1, g1, t1), (s2, l2, g2, t2) in zip(one_losses, two_losses, strict=True):
        assert s1 == s2 and t1 == t2  # tokens summed over both ranks = the single process's tokens
        assert l2 == pytest.approx(l1, rel=1e-4) and g2 == pytest.approx(g1, rel=1e-3)
    assert summary["tokens"] == json.loads((tmp_path / "one" / "summary.json").read_text())["tokens"]


def test_two_sweep_workers_share_one_study_without_running_a_trial_twice(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ["sweep", "tiny-dialogpt-banking77", "--trials", "1", "--study", "shared", "--storage", url,
            "--runs-dir", str(tmp_path / "runs"), "--set", "train.max_steps=4", "--set", "train.eval_steps=2",
            "--set", "train.save_steps=2", "--set", "data.max_samples=120"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    workers = [subprocess.Popen([sys.executable, "-m", "peftlab", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-1500:] for o in outputs)

    study = optuna.load_study(study_name="shared", storage=url)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == [0, 1]  # each worker ran its own trial: none twice, none lost
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    trial_folders = sorted(p.name for p in (tmp_path / "runs" / "shared").iterdir() if p.name.startswith("trial-"))
    assert len(trial_folders) == 2


def test_launch_options_are_consumed_by_the_parent() -> None:
    argv = ["train", "r.yaml", "--gpus", "2", "--strategy=fsdp", "--set", "train.lr=1e-4", "--gpus=4", "--nnodes", "2",
            "--node-rank=1", "--rdzv-endpoint", "h:29400", "--rdzv-id", "j"]
    assert without_options(argv, LAUNCH_OPTIONS) == ["train", "r.yaml", "--set", "train.lr=1e-4"]


@pytest.mark.parametrize(("strategy", "key"), [("ddp", "ddp_find_unused_parameters"), ("fsdp", "fsdp"),
                                               ("zero2", "deepspeed"), ("zero3", "deepspeed")])
def test_each_strategy_becomes_trainer_arguments(monkeypatch: pytest.MonkeyPatch, strategy: str, key: str) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("PEFTLAB_STRATEGY", strategy)
    arguments = trainer_strategy_arguments()
    assert key in arguments
    if strategy.startswith("zero"):
        assert arguments["deepspeed"]["zero_optimization"]["stage"] == int(strategy[-1])


def test_one_process_adds_no_strategy_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("PEFTLAB_STRATEGY", "fsdp")
    assert trainer_strategy_arguments() == {}
