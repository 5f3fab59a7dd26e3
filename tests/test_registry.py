"""The run registry: filters, reconciliation with the folders, rebuild when lost or corrupt, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.config import load_recipe
from peftlab.errors import PeftlabError
from peftlab.registry import INDEX_NAME, Registry, index_run
from peftlab.runs import RunDir, atomic_dir, honour_umask

WRITERS, RUNS_PER_WRITER = 4, 10


def names(entries) -> set[str]:
    return {e.name for e in entries}


def test_record_query_and_filters(make_run, runs_dir):
    make_run("sft-lora", {"eval_loss": 1.5, "runtime_s": 65.0, "started_at": "2025-01-01T10:00:00+0000"})
    make_run("sft-qlora", {"method": "qlora", "status": "failed", "started_at": "2025-01-02T10:00:00+0000"})
    make_run("cls", {"task": "classify", "recipe": "tiny-banking77", "test_accuracy": 0.9, "test_f1": 0.88,
                     "started_at": "2025-01-03T10:00:00+0000"})
    registry = Registry(runs_dir)
    registry.sync()
    assert [e.name for e in registry.query()] == ["cls", "sft-qlora", "sft-lora"]  # newest first
    assert names(registry.query(task="sft")) == {"sft-lora", "sft-qlora"}
    assert names(registry.query(method="qlora")) == {"sft-qlora"}
    assert names(registry.query(status="completed", task="sft")) == {"sft-lora"}
    assert names(registry.query(recipe="tiny-banking77")) == {"cls"}
    with pytest.raises(PeftlabError, match="did you mean 'failed'"):
        registry.query(status="fail")

    by_name = {e.name: e for e in registry.query()}
    assert by_name["sft-lora"].as_dict()["key_metrics"] == {"eval_loss": 1.5}
    assert by_name["cls"].as_dict()["key_metrics"] == {"test_accuracy": 0.9, "test_f1": 0.88}
    assert by_name["sft-lora"].cells()[6] == "1m05s"


def test_sync_follows_the_folders(make_run, runs_dir):
    run = make_run("a", {"status": "running"})
    make_run("b", {})
    registry = Registry(runs_dir)
    registry.sync()
    assert {e.name: e.status for e in registry.query()} == {"a": "running", "b": "completed"}

    run.update_summary(status="completed", eval_loss=1.25)  # a run that ended without telling the registry
    shutil.rmtree(runs_dir / "b")
    make_run("c", {})
    registry.sync()
    entries = {e.name: e for e in registry.query()}
    assert set(entries) == {"a", "c"}
    assert entries["a"].status == "completed" and entries["a"].summary["eval_loss"] == 1.25


def test_rebuilt_from_folders_when_missing_or_corrupt(make_run, runs_dir):
    for i in range(3):
        make_run(f"run{i}", {"status": ["completed", "failed", "interrupted"][i]})
    nested = RunDir.create(runs_dir / "study", "trial-0", load_recipe("tiny-gemma2-dolly"))  # sweeps may nest trials
    expected = {"run0": "completed", "run1": "failed", "run2": "interrupted", "study/trial-0": "running"}
    assert nested.path.exists()

    index = runs_dir / INDEX_NAME
    assert not index.exists()
    assert {e.name: e.status for e in Registry(runs_dir).query()} == expected  # missing: built on first use

    index.write_bytes(b"this is not an sqlite database" * 100)  # corrupt: rebuilt, not an error
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    assert {e.name: e.status for e in Registry(runs_dir).query()} == expected

    with sqlite3.connect(index) as conn:  # an index from an older schema: rebuilt as well
        conn.execute("PRAGMA user_version = 0")
    assert {e.name: e.status for e in Registry(runs_dir).query()} == expected

    nested.update_summary(status="completed")
    index_run(nested)  # a sweep trial's runner indexes into the enclosing runs folder's index
    assert not (runs_dir / "study" / INDEX_NAME).exists()
    assert {e.name: e.status for e in Registry(runs_dir).query()}["study/trial-0"] == "completed"


def test_a_run_with_an_unreadable_summary_is_listed_not_fatal(make_run, runs_dir):
    run = make_run("ok", {})
    broken = make_run("broken", {})
    broken.summary_path.write_text("{ not json")
    registry = Registry(runs_dir)
    registry.sync()
    assert {e.name: e.status for e in registry.query()} == {"ok": "completed", "broken": "unreadable"}
    assert run.path.exists()


def _writer(runs_dir: str, worker: int, start) -> None:
    """One process: creates runs, records them running, then completed (what run_recipe does)."""
    recipe = load_recipe("tiny-gemma2-dolly")
    registry = Registry(Path(runs_dir))
    start.wait()  # every process begins writing at the same moment
    for i in range(RUNS_PER_WRITER):
        run = RunDir.create(Path(runs_dir), f"w{worker}-r{i}", recipe)
        run.update_summary(task="sft", method="lora", status="running")
        registry.record(run)
        run.update_summary(status="completed", eval_loss=float(worker * 100 + i))
        registry.record(run)
        if i % 2 == 0:
            registry.sync()  # readers reconciling while others write


def test_concurrent_writer_processes_keep_the_index_consistent(runs_dir):
    runs_dir.mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: real separate processes and connections
    start = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(str(runs_dir), w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    with sqlite3.connect(runs_dir / INDEX_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    entries = Registry(runs_dir).query()  # no sync: what the writers left in the index
    assert len(entries) == WRITERS * RUNS_PER_WRITER
    for entry in entries:
        on_disk = json.loads((runs_dir / entry.name / "summary.json").read_text())
        assert entry.status == on_disk["status"] == "completed"
        assert entry.summary["eval_loss"] == on_disk["eval_loss"]


def test_runs_command(make_run, runs_dir, tmp_path):
    make_run("a", {"eval_loss": 1.5})
    make_run("b", {"method": "qlora", "status": "failed"})
    cli = [sys.executable, "-m", "peftlab", "runs", "--runs-dir", str(runs_dir)]
    listed = json.loads(subprocess.run([*cli, "--json", "--method", "qlora"], capture_output=True, text=True,
                                       check=True).stdout)
    assert [e["name"] for e in listed] == ["b"] and listed[0]["status"] == "failed"
    table = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "eval loss 1.5000" in table and "key metric" in table
    gone = subprocess.run([sys.executable, "-m", "peftlab", "runs", "--runs-dir", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert gone.returncode == 2 and "does not exist" in gone.stderr


def test_a_broken_index_never_fails_a_training_run(make_run, runs_dir, capsys):
    run = make_run("a", {})
    (runs_dir / INDEX_NAME).mkdir()  # unopenable: neither a database nor corrupt bytes that could be replaced
    index_run(run)  # what the runner calls: warns instead of raising
    assert "warning: run registry not updated" in capsys.readouterr().out
    with pytest.raises(PeftlabError, match=r"run index .* not usable"):
        Registry(runs_dir).query()


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_runs_at_60_columns_show_every_name_whole(make_run, runs_dir, encoding):
    long_names = ["alpaca-lora-r16-lr2e-4-20261130-101500", "alpaca-qlora-r16-lr2e-4-20261130-101501"]
    for name in long_names:
        make_run(name, {"eval_loss": 1.25})
    env = {**os.environ, "COLUMNS": "60", "PYTHONIOENCODING": encoding}
    out = subprocess.run([sys.executable, "-m", "peftlab", "runs", "--runs-dir", str(runs_dir)], capture_output=True,
                         text=True, check=True, env=env, encoding=encoding).stdout
    assert all(name in out for name in long_names), out
    assert "\u2026" not in out and "eval loss 1.2500" in out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_honour_the_umask(runs_dir, umask):
    previous = os.umask(umask)
    try:
        run = RunDir.create(runs_dir, f"shared-{umask:o}", load_recipe("tiny-gemma2-dolly"))
        run.update_summary(status="completed")
    finally:
        os.umask(previous)
    for name in ("config.yaml", "summary.json"):
        assert (run.path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_written_by_safetensors_honour_the_umask(tmp_path, umask):
    """safetensors' save_file (peft's adapter, export, our checkpoints) creates 0o600 files whatever the umask."""
    import torch
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "adapter") as folder:
            save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
        save_file({"w": torch.zeros(2)}, str(tmp_path / "trainable.safetensors"))
        honour_umask(tmp_path / "trainable.safetensors")
    finally:
        os.umask(previous)
    for file in (tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "trainable.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_a_read_only_runs_folder_is_listed_from_the_folders(make_run, runs_dir, monkeypatch):
    """An archived or shared runs folder that this user cannot write: `runs` lists it (index in memory)."""
    make_run("archived", {"eval_loss": 1.5})
    (runs_dir / INDEX_NAME).unlink(missing_ok=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if mode == os.W_OK else real_access(path, mode))
    assert names(Registry(runs_dir).query()) == {"archived"}
    assert not (runs_dir / INDEX_NAME).exists()
