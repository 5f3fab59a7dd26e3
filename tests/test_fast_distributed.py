"""The fast engine on several processes, end to end through `peftlab train` (issue 13 item 5): 2 gloo processes on
the CPU stand in for `--gpus 2`. One run folder written once by rank 0, the losses of one process at the same global
batch, a stop on one rank (a signal, the guard) taken by every rank at one step without a hang, and a step-exact
resume with each rank's own RNG state (LoRA dropout on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from peftlab.config import load_recipe, with_overrides
from peftlab.runner import run_recipe
from peftlab.runs import RunDir, read_jsonl

WORKER = Path(__file__).with_name("fast_dp_stop_worker.py")
# batch 2 per process; the one-process reference takes the same 8 rows per step as batch 2 x accumulation 4, so its
# evaluation batches (per_device_eval_batch_size = batch_size) are the ones the two ranks share out. 4 evaluation rows
# (0.12 of the 33 kept): a multiple of 2 ranks x 2, as accelerate completes a rank's short last batch with repeated
# rows, whose tokens enter that batch's mean loss (the Trainer's own DDP evaluation, on the hf engine too).
SETTINGS = {"train.engine": "fast", "data.max_samples": 64, "data.eval_fraction": 0.12, "data.max_length": 64,
            "train.max_steps": 6, "train.logging_steps": 1, "train.batch_size": 2, "eval.prompts": ["Hi"],
            "eval.max_new_tokens": 2, "eval.compare_base": False}
TIMEOUT = 420  # a stop that left one rank waiting in a collective would hang: fail instead


def sets(changes: dict) -> list[str]:
    return [arg for key, value in {**SETTINGS, **changes}.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """`python ARGS`; on a timeout its whole process group is killed (torchrun's ranks too), then the test fails."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def two_ranks(event: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`peftlab train ARGS` as `--gpus 2` launches it, with `event` on rank 0 (fast_dp_stop_worker.py)."""
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), event, str(out),
               "train", *args)


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == kind]


def test_two_processes_write_one_run_with_the_losses_of_one_process_at_their_global_batch(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = run_recipe(with_overrides(load_recipe("tiny-gemma2-dolly"), {
            **SETTINGS, "method.lora.dropout": 0.0, "train.grad_accum": 4, "train.eval_steps": 3}),
            tmp_path, "one", show_progress=False)  # also builds the preset's cache, once
    two = run("-m", "peftlab", "train", "tiny-gemma2-dolly", "--gpus", "2", *sets(
        {"method.lora.dropout": 0.0, "train.grad_accum": 2, "train.eval_steps": 3}), "--runs-dir", str(tmp_path),
        "--name", "two")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]

    summary, reference = RunDir(tmp_path / "two").summary(), one.summary()
    assert summary["status"] == "completed" and summary["engine"] == "fast" and summary["world_size"] == 2
    assert len(summary["peak_mem_per_rank"]) == 2
    got, want = records(tmp_path / "two"), records(one.path)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # written once, by rank 0
    # fp32; the gradients are summed over the ranks in another order than one process sums its micro-batches
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5) and g["grad_norm"] == pytest.approx(w["grad_norm"],
                                                                                                   rel=1e-4)
        assert g["tokens"] == w["tokens"] and g["samples"] == w["samples"]  # counted over both ranks
    assert got[-1]["loss"] != got[0]["loss"]  # it trained
    # every rank's tokens in the summary: the steady-state count too (on the CPU every step is steady)
    assert summary["tokens"] == summary["steady_tokens"] == reference["tokens"] == reference["steady_tokens"]
    # the Trainer's sharded evaluation over both ranks: the one process's batches, shared out
    evals = [(r["step"], r["eval_loss"]) for r in records(tmp_path / "two", "eval")]
    assert [s for s, _ in evals] == [3, 6]
    assert [v for _, v in evals] == pytest.approx([r["eval_loss"] for r in records(one.path, "eval")], rel=1e-4)
    assert summary["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-4)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_signal_on_one_rank_stops_both_at_one_step_and_the_resume_is_step_exact(tmp_path: Path) -> None:
    straight = run("-m", "peftlab", "train", "tiny-gemma2-dolly", "--gpus", "2", *sets({"train.grad_accum": 2}),
                   "--runs-dir", str(tmp_path), "--name", "straight")
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-3000:]

    stopped = two_ranks("sigint@2", tmp_path, "tiny-gemma2-dolly", *sets({"train.grad_accum": 2,
                                                                          "train.save_steps": 3}),
                        "--runs-dir", str(tmp_path), "--name", "halves")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # rank 0's request rides in step 3's gradient all-reduce and is read one step late: both stop after step 4
    assert ranks == [{"exit": 130, "last_step": 4}] * 2, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    summary = RunDir(tmp_path / "halves").summary()
    assert summary["status"] == "interrupted" and summary["checkpoint"].endswith("checkpoint-4")

    resumed = run("-m", "peftlab", "train", "--resume", str(tmp_path / "halves"), "--gpus", "2")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    summary, reference = RunDir(tmp_path / "halves").summary(), RunDir(tmp_path / "straight").summary()
    assert summary["status"] == "completed" and summary["resumes"][-1]["from_step"] == 4
    got, want = records(tmp_path / "halves"), records(tmp_path / "straight")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    fields = ("step", "loss", "grad_norm", "lr", "tokens", "samples")
    assert [[r[f] for f in fields] for r in got] == [[r[f] for f in fields] for r in want]  # dropout on: each
    assert summary["tokens"] == reference["tokens"]  # rank's RNG and counters went on from the checkpoint


def test_a_guard_stop_on_rank_0_stops_both_ranks_without_a_hang(tmp_path: Path) -> None:
    two_ranks("guard@2", tmp_path, "tiny-gemma2-dolly", *sets({"train.max_steps": 4}), "--runs-dir", str(tmp_path),
              "--name", "guarded")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # both raised at step 2's log, before its step end; rank 1's own guard saw nothing wrong: it took rank 0's
    assert ranks == [{"exit": 3, "last_step": 1}] * 2
    summary = RunDir(tmp_path / "guarded").summary()
    assert summary["status"] == "failed" and summary["reason"] == "health guard"
    assert "injected on rank 0 only" in summary["diagnosis"]
    assert [r["step"] for r in records(tmp_path / "guarded")] == [1, 2]
    assert (tmp_path / "guarded" / "adapter" / "adapter_model.safetensors").is_file()
