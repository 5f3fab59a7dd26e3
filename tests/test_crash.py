"""SIGKILL at any moment: the last complete checkpoint loads, metrics.jsonl reads, summary.json parses,
and --resume continues. Plus retention (last N + best) and the atomic writers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab.reliability.checkpoints import checkpoints, latest_complete, problem, prune
from peftlab.runner import resume_run
from peftlab.runs import RunDir, atomic_dir, atomic_write_json, read_jsonl

# Killed inside HF's _save_checkpoint at step 4: weights, optimizer and scheduler are on disk, RNG state
# and trainer_state.json are not. A torn metrics line is left as if the kill landed mid-append too.
KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer

original, metrics = Trainer._save_rng_state, os.path.join(sys.argv[1], "metrics.jsonl")

def dying(self, output_dir):
    if self.state.global_step == 4:
        with open(metrics, "a") as fh:
            fh.write('{"kind": "train", "step": 5, "lo')
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)

Trainer._save_rng_state = dying
from peftlab.cli import main
sys.argv = ["peftlab", *sys.argv[2:]]
main()
"""


def cli_command(runs_dir: Path, name: str, sets: list[str]) -> list[str]:
    return ["train", "tiny-gemma2-dolly", *sets, "--runs-dir", str(runs_dir), "--name", name]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def assert_loadable(checkpoint: Path) -> None:
    """What resuming reads, read as the Trainer does: weights (safetensors), optimizer/scheduler/RNG state
    (torch.load with weights_only=True, numpy's RNG types allowlisted)."""
    from transformers.trainer_pt_utils import safe_globals

    assert problem(checkpoint) is None
    assert load_file(checkpoint / "adapter_model.safetensors")
    with safe_globals():
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.load(checkpoint / name, weights_only=True)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(checkpoint.name.split("-")[1])


def test_sigkill_while_writing_a_checkpoint(runs_dir, fast_sets):
    sets = [*fast_sets, "--set", "train.max_steps=6", "--set", "train.logging_steps=1", "--set", "train.save_steps=2"]
    run = RunDir(runs_dir / "k")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(run.path), *cli_command(runs_dir, "k", sets)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]

    assert run.summary()["status"] == "running"  # valid JSON, and not looking complete
    assert run.metrics_path.read_text().endswith('"lo')  # the torn line is there ...
    before = losses(read_jsonl(run.metrics_path))  # ... and skipped
    assert sorted(before) == [1, 2, 3, 4]
    assert "trainer_state.json" in problem(run.checkpoints_path / "checkpoint-4")
    assert latest_complete(run.checkpoints_path).name == "checkpoint-2"
    assert_loadable(run.checkpoints_path / "checkpoint-2")

    resume_run("k", runs_dir, show_progress=False)
    after = losses(run.metrics())
    assert sorted(after) == list(range(1, 7))  # steps 3-4 re-run and logged once; the torn line is gone
    for step in (3, 4):  # re-run from checkpoint-2's optimizer/RNG/data position: the same losses
        assert after[step] == pytest.approx(before[step], rel=1e-5)
    assert run.summary()["status"] == "completed"
    assert [c.name for c in checkpoints(run.checkpoints_path)] == ["checkpoint-4", "checkpoint-6"]
    assert_loadable(run.checkpoints_path / "checkpoint-4")


def test_sigkill_at_an_arbitrary_moment(runs_dir, fast_sets):
    sets = [*fast_sets, "--set", "train.max_steps=10", "--set", "train.logging_steps=1", "--set", "train.save_steps=1"]
    run = RunDir(runs_dir / "a")
    proc = subprocess.Popen([sys.executable, "-m", "peftlab", *cli_command(runs_dir, "a", sets)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(read_jsonl(run.metrics_path)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # anywhere in a step, a log line or a checkpoint write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    assert run.summary()["status"] == "running"
    before = losses(read_jsonl(run.metrics_path))
    last = latest_complete(run.checkpoints_path)
    assert last is not None
    assert_loadable(last)

    resume_run("a", runs_dir, show_progress=False)
    after = losses(run.metrics())
    assert sorted(after) == list(range(1, 11))
    for step, loss in before.items():
        assert after[step] == pytest.approx(loss, rel=1e-5), step
    assert run.summary()["status"] == "completed"


def fake_checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, path / "adapter_model.safetensors")
    torch.save({"state": {}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_latest_complete_skips_what_a_crash_left_behind(tmp_path):
    for step in (1, 2, 3, 4, 5):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-5" / "trainer_state.json").unlink()  # killed before the state was written
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # torn state
    truncate(tmp_path / "checkpoint-3" / "adapter_model.safetensors")
    truncate(tmp_path / "checkpoint-2" / "optimizer.pt")
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-1"
    assert [problem(tmp_path / f"checkpoint-{s}") is None for s in (1, 2, 3, 4, 5)] == [True, False, False, False, False]


def test_prune_keeps_the_last_n_and_the_best(tmp_path):
    for step in range(1, 7):
        fake_checkpoint(tmp_path, step)
    in_progress = tmp_path / "checkpoint-7"
    in_progress.mkdir()  # a save still being written: newer than every complete one, never deleted
    prune(tmp_path, keep_last=2, best=str(tmp_path / "checkpoint-2"))
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-5", "checkpoint-6", "checkpoint-7"]
    assert not any(p.name.startswith(".trash") for p in tmp_path.iterdir())
    prune(tmp_path, keep_last=1, best=None)
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-7"]


def test_retention_in_a_run_keeps_last_n_plus_best(tiny_recipe, runs_dir):
    from peftlab.runner import run_recipe

    recipe = tiny_recipe({"train.max_steps": 4, "train.save_steps": 1, "train.eval_steps": 1, "train.save_total_limit": 2,
                          "train.best_metric": "eval_loss", "eval.compare_base": False})
    run = run_recipe(recipe, runs_dir, "keep", show_progress=False)
    kept = [c.name for c in checkpoints(run.checkpoints_path)]
    evals: dict[int, float] = {}
    for r in run.metrics():  # the first eval per step: the one after it is the final evaluation
        if r["kind"] == "eval":
            evals.setdefault(r["step"], r["eval_loss"])
    best = f"checkpoint-{min(evals, key=evals.get)}"
    assert set(kept) == {"checkpoint-3", "checkpoint-4", best}


def test_atomic_writers_leave_the_old_file_or_folder_on_a_crash(tmp_path, monkeypatch):
    summary = tmp_path / "summary.json"
    atomic_write_json(summary, {"status": "running"})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        atomic_write_json(summary, {"status": "completed"})
    monkeypatch.undo()
    assert json.loads(summary.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left

    adapter = tmp_path / "adapter"
    with atomic_dir(adapter) as folder:
        (folder / "adapter_model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(adapter) as folder:
        (folder / "adapter_model.safetensors").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (adapter / "adapter_model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "summary.json"]
