"""Several GPUs (issue 13), on CPUs: FSDP's adapter, one GPU per process by default, multi-node launch,
sweep workers. gloo processes stand in for GPUs; what only GPUs can show is listed in bench/README.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("fsdp_adapter_worker.py")


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_fsdp_sharded_adapter_saves_whole_and_loads_in_one_process_with_the_same_logits(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = torchrun("--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharded["base"]),
                                      tmp_path / "run" / "adapter")
    with torch.no_grad():
        logits = model(input_ids=sharded["input_ids"]).logits
    torch.testing.assert_close(logits, sharded["logits"], rtol=1e-5, atol=1e-5)
    # Generations after training: every rank took part (rank 0 alone would wait forever for the others' shards)
    from peftlab.config import load_recipe
    from peftlab.runs import read_jsonl
    from peftlab.tasks.sft import generate

    recipe = load_recipe("tiny-gemma2-dolly", ['eval.prompts=["Hi"]', "eval.max_new_tokens=4"])
    [row] = read_jsonl(tmp_path / "run" / "samples" / "generations.jsonl")
    assert row["adapter"] == generate(model, AutoTokenizer.from_pretrained(sharded["base"]), "Hi", recipe)
    with torch.no_grad(), model.disable_adapter():  # the adapter is not a no-op: a lost adapter would show
        assert not torch.allclose(model(input_ids=sharded["input_ids"]).logits, sharded["logits"], atol=1e-3)


def test_several_visible_gpus_without_flags_train_on_the_first_and_say_how_to_use_all(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CPU fakes 2 CUDA devices: `peftlab train` with no --gpus neither launches nor reaches the Trainer's
    nn.DataParallel (which trl refuses with a traceback): the process keeps only the first visible GPU."""
    from typer.testing import CliRunner

    import peftlab.cli
    import peftlab.runner
    import peftlab.watch.console

    seen: dict[str, str | None] = {}
    notes: list[str] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(peftlab.cli, "launch", lambda *a, **k: pytest.fail(f"launched {a}"))
    monkeypatch.setattr(peftlab.watch.console, "say", notes.append)

    def execute(recipe, run, *args, **kwargs):
        seen["visible"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return run

    monkeypatch.setattr(peftlab.runner, "_execute", execute)
    result = CliRunner().invoke(peftlab.cli.app, ["train", "tiny-gemma2-dolly", "--runs-dir", str(tmp_path), "--name", "one"])
    assert result.exit_code == 0, result.output
    assert seen == {"visible": "3"}  # the first of the GPUs this process was given
    assert [n for n in notes if "GPUs visible" in n] == [
        "note: 2 GPUs visible; this process trains on GPU 3 only (the recipe's batch is per process); "
        "use all of them with --gpus 2"]


def test_trainer_arguments_drive_one_gpu_when_cuda_saw_several_first(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """When CUDA was initialised before use_one_gpu could hide the other GPUs, the Trainer still counts them:
    the arguments the engine builds must not ask for nn.DataParallel."""
    from transformers import TrainingArguments

    from peftlab.distributed import one_gpu_per_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    args._n_gpu = 2  # what _setup_devices counts on a 2-GPU machine (this CPU has none)
    assert one_gpu_per_process(args).n_gpu == 1


def peftlab(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


SMALL = ["--set", "train.max_steps=3", "--set", "train.logging_steps=1", "--set", "data.max_samples=32",
         "--set", 'eval.prompts=["Hi"]', "--set", "eval.max_new_tokens=2"]


def test_two_nodes_of_one_process_meet_at_a_c10d_rendezvous_and_train_one_run(tmp_path: Path) -> None:
    import json
    import socket

    from peftlab.models.presets import preset_checkpoint
    from peftlab.runs import read_jsonl

    # Built here first: under a process group transformers writes weights on global rank 0 only, so two ranks
    # building a fresh preset cache race (the other rank's weightless folder can win; see the report of issue 13).
    preset_checkpoint("tiny-gemma2", torch.float32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    nodes = [subprocess.Popen([sys.executable, "-m", "peftlab", "train", "tiny-gemma2-dolly", *SMALL, "--nnodes", "2",
                               "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t2n",
                               "--runs-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for rank in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders  # both machines' ranks agreed on one run (rank 0's name)
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and len(summary["peak_mem_per_rank"]) == 2
    assert [r["step"] for r in read_jsonl(folders[0] / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]
    assert (folders[0] / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("args", "says"), [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"], "--node-rank 2: must be in 0..1"),
    (["--node-rank", "1"], "--node-rank/--rdzv-endpoint/--rdzv-id need --nnodes > 1"),
    (["--rdzv-endpoint", "nohost"], "--node-rank/--rdzv-endpoint/--rdzv-id need --nnodes > 1"),
    (["--nnodes", "2", "--rdzv-endpoint", "nohost"], "needs --rdzv-endpoint HOST:PORT"),
])
def test_inconsistent_node_options_are_one_line(args: list[str], says: str) -> None:
    from peftlab.distributed import Nodes
    from peftlab.errors import PeftlabError

    values = dict(zip(args[::2], args[1::2], strict=True))
    nodes = Nodes(int(values.get("--nnodes", 1)), int(values["--node-rank"]) if "--node-rank" in values else None,
                  values.get("--rdzv-endpoint"), values.get("--rdzv-id"))
    with pytest.raises(PeftlabError, match=says.replace("+", r"\+").replace(".", r"\.")):
        nodes.check()


def test_bad_launch_combinations_exit_2_with_one_line_before_launching() -> None:
    done = peftlab("train", "tiny-gemma2-dolly", "--nnodes", "2", "--node-rank", "0")
    said = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(said) == 1 and said[0].startswith("error: --nnodes 2 needs --rdzv-endpoint")
    fsdp = peftlab("train", "tiny-gemma2-dolly", "--gpus", "2", "--strategy", "fsdp")
    assert fsdp.returncode == 2 and "error: --strategy fsdp: needs CUDA GPUs" in fsdp.stdout + fsdp.stderr


def test_sweep_on_two_gpus_shares_one_study_and_two_final_workers_retrain_once(tmp_path: Path) -> None:
    import optuna

    runs = tmp_path / "runs"
    common = ["tiny-dialogpt-banking77", "--study", "two", "--runs-dir", str(runs), "--set", "train.max_steps=4",
              "--set", "train.eval_steps=2", "--set", "train.save_steps=2", "--set", "data.max_samples=120"]
    done = peftlab("sweep", *common, "--gpus", "2", "--trials", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 worker(s) (CPU processes)" in done.stdout
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{runs / 'two' / 'study.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2]  # 2 + 1 trials over two workers, none twice
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # the median rule may prune one
    assert all(t.state in finished for t in study.trials), [t.state for t in study.trials]
    assert (runs / "two" / "sweep.json").is_file()  # written by the parent over the shared study

    # Two workers asking for --final at once (the issue saw both retrain into final-trial-NNN): one trains it.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    finals = [subprocess.Popen([sys.executable, "-m", "peftlab", "sweep", *common, "--trials", "0", "--resume",
                                "--final"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for _ in range(2)]
    outputs = [f.communicate(timeout=600)[0] for f in finals]
    assert [f.returncode for f in finals] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert sum("--- final run with the best parameters" in o for o in outputs) == 1
    assert sum("already completed with these parameters; reusing it" in o for o in outputs) == 1
    assert len([p for p in (runs / "two").iterdir() if p.name.startswith("final-")]) == 1


def test_a_dead_workers_trial_is_failed_and_queued_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What sweep.storage sets up: a RUNNING trial whose heartbeat stopped is failed by the next worker's
    check and retried once with the same parameters."""
    import time

    import optuna

    from peftlab import sweep

    monkeypatch.setattr(sweep, "HEARTBEAT_S", 1)
    monkeypatch.setattr(sweep, "GRACE_S", 1)
    store = sweep.storage(None, tmp_path)
    study = optuna.create_study(storage=store, study_name="s")
    dead = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    store.record_heartbeat(dead._trial_id)  # then the worker "dies": no more heartbeats
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.trials[1].params == dead.params


@pytest.mark.parametrize(("installed", "expected"), [
    ({"psycopg2"}, "postgresql+psycopg2://u@h/db"), ({"psycopg"}, "postgresql+psycopg://u@h/db"),
    ({"psycopg2", "psycopg"}, "postgresql+psycopg2://u@h/db")])
@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h/db"])
def test_a_postgresql_url_gets_the_installed_driver(monkeypatch: pytest.MonkeyPatch, installed: set[str],
                                                   expected: str, url: str) -> None:
    from peftlab import sweep

    monkeypatch.setattr(sweep.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert sweep.with_driver(url) == expected
    assert sweep.with_driver("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"  # named: kept
    assert sweep.with_driver("sqlite:///x.db") == "sqlite:///x.db"


def test_a_postgresql_url_without_a_driver_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftlab import sweep
    from peftlab.errors import PeftlabError

    monkeypatch.setattr(sweep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PeftlabError, match=r"no PostgreSQL driver is installed; fix: pip install psycopg2-binary"):
        sweep.with_driver("postgresql://u@h/db")
