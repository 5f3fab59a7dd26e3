"""Dead runs and racing writers: a run killed without recording its end is shown `dead` everywhere,
`watch` ends on it, and one run folder has one writer at a time (issue 12, items 7 and 8)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from peftlab.errors import PeftlabError
from peftlab.registry import Registry
from peftlab.report.compare import compare
from peftlab.report.html import write_report
from peftlab.runlock import LOCK_NAME, process_start, shown_status
from peftlab.runs import RunDir, open_run, read_jsonl
from peftlab.watch.live import follow, wait_for_run


def peftlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftlab", *args]


def test_a_sigkilled_run_is_dead_everywhere(runs_dir, fast_sets, cli, capsys, tmp_path):
    sets = [*fast_sets, "--set", "train.max_steps=400", "--set", "train.logging_steps=1"]
    proc = subprocess.Popen(peftlab("train", "tiny-gemma2-dolly", *sets, "--runs-dir", str(runs_dir), "--name", "k"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = RunDir(runs_dir / "k")
    deadline = time.monotonic() + 240
    while not read_jsonl(run.metrics_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.shown_status() == "running"  # alive: its lock is held
    code, lines = cli("runs", "--runs-dir", str(runs_dir), "--json")
    assert json.loads("\n".join(lines))[0]["status"] == "running"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    assert run.summary()["status"] == "running"  # what the killed process left: never rewritten by readers
    assert run.shown_status() == "dead"
    code, lines = cli("runs", "--runs-dir", str(runs_dir), "--json")
    assert code == 0 and json.loads("\n".join(lines))[0]["status"] == "dead"
    code, lines = cli("runs", "--runs-dir", str(runs_dir), "--status", "dead")
    assert code == 0 and any(line.split()[0] == "k" and "dead" in line.split() for line in lines), lines
    assert [e.name for e in Registry(runs_dir).query(status="running")] == []
    assert compare([run]).rows[0]["status"] == "dead"
    page = write_report([run], tmp_path / "r.html").read_text()
    assert 'class="status-dead">dead</span>' in page and "ended without recording" in page

    started = time.monotonic()
    code, lines = cli("watch", "k", "--runs-dir", str(runs_dir), "--interval", "0.1")
    assert code == 1 and time.monotonic() - started < 30
    assert lines[-1].startswith("run dead: process ") and f"--resume {run.path}" in lines[-1], lines[-2:]

    code, lines = cli("train", "--resume", "k", "--runs-dir", str(runs_dir))  # a dead run is not "still trained"
    assert code == 2 and "no complete checkpoint" in lines[-1], lines[-1]


def test_pid_reuse_and_runs_without_a_lock(make_run):
    """A run written before run folders had locks: its pid decides, and a pid now used by another
    process (another start time) is not the run's process."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    run = make_run("old", {"status": "running", **me, "pid_start": process_start(os.getpid())})
    run.release()
    (run.path / LOCK_NAME).unlink()
    assert run.shown_status() == "running"
    run.update_summary(pid_start=process_start(os.getpid()) + 1)  # the pid was reused
    assert run.shown_status() == "dead"
    run.update_summary(pid_start=None, host="another-host")  # cannot be told from here: as recorded
    assert run.shown_status() == "running"
    sleeper = subprocess.Popen([sys.executable, "-c", "pass"])
    sleeper.wait()
    run.update_summary(pid=sleeper.pid, host=socket.gethostname())  # that pid is gone
    assert run.shown_status() == "dead"
    assert shown_status(run.path, {"status": "completed"}) == "completed"


def test_watch_waits_for_the_run_folder(make_run, runs_dir, cli):
    made: list[RunDir] = []

    def sleep(_: float) -> None:  # the run appears while watch waits
        if not made:
            made.append(make_run("late", {"status": "running"}))

    assert wait_for_run("late", runs_dir, timeout=60, sleep=sleep).path == runs_dir / "late"
    clock = iter(range(0, 1000, 5))
    with pytest.raises(PeftlabError, match=r"run 'nope' not found after waiting 12s.*--timeout"):
        wait_for_run("nope", runs_dir, timeout=12, sleep=lambda _: None, clock=lambda: next(clock))
    code, lines = cli("watch", "nope", "--runs-dir", str(runs_dir), "--timeout", "0")
    assert code == 2 and lines[-1].startswith("error: run 'nope' not found after waiting 0s")


def test_follow_ends_on_a_run_that_dies(make_run, capsys):
    run = make_run("w", {"status": "running", "pid": os.getpid(), "host": socket.gethostname()})
    calls = []

    def sleep(_: float) -> None:  # the training process dies (its lock is freed) after two polls
        calls.append(1)
        if len(calls) == 2:
            run.release()

    assert follow(run, interval=0.01, sleep=sleep) == "dead" and len(calls) == 2
    assert "run dead: process" in capsys.readouterr().out


# Both processes start creating the folder within a millisecond, and writing config.yaml takes a
# second (a slow disk): the window in which both saw an empty folder and went on, each logging every step.
RACER = """
import sys, time
from pathlib import Path
import peftlab.cli, peftlab.runner, peftlab.runs, peftlab.tasks.sft  # the slow imports, before the start line
write = peftlab.runs.atomic_write_text
def slow_write(path, text, **kwargs):
    if path.name == "config.yaml":
        time.sleep(1.0)
    write(path, text, **kwargs)
peftlab.runs.atomic_write_text = slow_write
Path(sys.argv[1]).write_text("ready")
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
sys.argv = ["peftlab", *sys.argv[3:]]
peftlab.cli.main()
"""


def test_two_trains_of_one_name_at_the_same_instant(runs_dir, fast_sets, tmp_path):
    go = tmp_path / "go"
    args = ["train", "tiny-gemma2-dolly", *fast_sets, "--runs-dir", str(runs_dir), "--name", "x"]
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(r), str(go), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in ready]
    deadline = time.monotonic() + 240
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.write_text("go")
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in procs].index(2)]
    errors = [line for line in loser.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("still being trained by process" in errors[0] or "already holds a run" in errors[0])
    assert "Traceback" not in loser
    steps = [r["step"] for r in read_jsonl(runs_dir / "x" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == [2, 4, 6]  # one writer: each step logged once
    assert RunDir(runs_dir / "x").summary()["status"] == "completed"


HOLDER = """
import sys, time
from peftlab.config import load_recipe
from peftlab.runs import RunDir
run = RunDir.create(sys.argv[1], "live", load_recipe("tiny-gemma2-dolly"))
run.update_summary(status="running")
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_writer_on_a_live_run_gets_one_error_line(runs_dir, cli):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(runs_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        config = (runs_dir / "live" / "config.yaml").read_text()
        for args in (["train", "tiny-gemma2-dolly", "--name", "live", "--overwrite"],
                     ["train", "tiny-gemma2-dolly", "--name", "live"],
                     ["train", "--resume", "live"]):
            code, lines = cli(*args, "--runs-dir", str(runs_dir))
            assert code == 2 and len(lines) == 1, (args, lines)
            assert lines[0].startswith(f"error: run '{runs_dir / 'live'}' is still being trained by process {holder.pid}")
        assert (runs_dir / "live" / "config.yaml").read_text() == config  # nothing replaced
    finally:
        holder.kill()
        holder.wait()
    assert RunDir(runs_dir / "live").shown_status() == "dead"
    code, lines = cli("train", "tiny-gemma2-dolly", "--name", "live", "--runs-dir", str(runs_dir))
    assert code == 2 and "already holds a run (status dead)" in lines[-1]


def test_a_run_not_found_names_each_folder_looked_in_once(tmp_path) -> None:
    runs_dir = tmp_path / "runs"
    with pytest.raises(PeftlabError, match=rf"\(no config.yaml in 'nope' or '{runs_dir}/nope'\)"):
        open_run("nope", runs_dir)
    absolute = tmp_path / "gone"  # runs_dir / an absolute path is that path: it was named twice
    with pytest.raises(PeftlabError, match=rf"\(no config.yaml in '{absolute}'\); fix: "):
        open_run(str(absolute), runs_dir)
