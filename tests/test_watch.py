"""`peftlab watch`: incremental tail, sparkline, speed and ETA, and following a run until it ends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peftlab.watch.live import (
    ASCII_RAMP,
    BLOCKS,
    MetricsTail,
    eta_seconds,
    follow,
    sparkline,
    status_line,
    steps_per_second,
)


def train_record(step: int, loss: float, seconds_per_step: float = 0.5) -> dict:
    return {"kind": "train", "step": step, "epoch": step / 100, "loss": loss, "grad_norm": 1.0, "lr": 1e-4,
            "tokens_per_s": 800.0, "mem_rss_gib": 1.2, "time": step * seconds_per_step}


def test_sparkline_tracks_the_values_in_unicode_and_ascii():
    falling = [5.0, 4.0, 3.0, 2.0, 1.0]
    for unicode, ramp in ((True, BLOCKS), (False, ASCII_RAMP)):
        line = sparkline(falling, unicode=unicode)
        assert len(line) == len(falling) and line[0] == ramp[-1] and line[-1] == ramp[0]
        assert [ramp.index(c) for c in line] == sorted((ramp.index(c) for c in line), reverse=True)
    assert sparkline(falling, unicode=False).isascii()
    assert len(set(sparkline([2.0] * 4))) == 1 and sparkline([]) == ""
    assert len(sparkline(list(map(float, range(100))), width=30)) == 30


def test_speed_and_eta_from_the_records():
    records = [train_record(s, 1.0, seconds_per_step=0.25) for s in range(10, 110, 10)]
    rate = steps_per_second(records)
    assert rate == pytest.approx(1 / 0.25)
    assert eta_seconds(100, 300, rate) == pytest.approx(200 / rate)
    assert steps_per_second(records[:1]) == pytest.approx(10 / (10 * 0.25))  # one record: since the start
    assert steps_per_second([]) is None and eta_seconds(10, None, rate) is None and eta_seconds(10, 100, None) is None


def test_tail_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []  # not created yet
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert tail.read() == [{"step": 1}]
    with open(path, "a") as fh:
        fh.write('ss": 0.5}\n{torn line}\n')
    assert tail.read() == [{"step": 2, "loss": 0.5}]
    assert tail.read() == []


def test_status_line_shows_progress_sparkline_and_eta(make_run):
    records = [train_record(s, 3.0 - s / 50) for s in range(10, 60, 10)]
    run = make_run("live", {"status": "running", "max_steps": 100}, records)
    line = status_line(run, run.summary(), records, age_s=3.0, unicode=False)
    rate = steps_per_second(records)
    assert "step 50/100 (50%)" in line and f"loss {records[-1]['loss']:.4g}" in line
    assert sparkline([r["loss"] for r in records], unicode=False) in line
    assert f"eta {int(round(50 / rate))}s" in line and "last log 3s ago" in line and line.isascii()
    empty = status_line(run, {"status": "running"}, [], None, unicode=False)
    assert "waiting for the first metrics" in empty and "eta n/a" in empty


def test_follow_prints_new_metrics_until_the_run_ends(make_run, capsys):
    run = make_run("live", {"status": "running", "max_steps": 40}, [train_record(10, 2.0)])
    script = [lambda: run.append_metrics(train_record(20, 1.5)),
              lambda: run.append_metrics({"kind": "eval", "step": 20, "epoch": 0.2, "eval_loss": 1.7}),
              lambda: (run.append_metrics(train_record(30, 1.2)), run.append_metrics(train_record(40, 1.0)),
                       run.update_summary(status="completed", eval_loss=1.1))]
    polls = []

    def sleep(seconds: float) -> None:  # each poll interval, the "training process" makes progress
        polls.append(seconds)
        script[len(polls) - 1]()

    assert follow(run, interval=0.25, sleep=sleep) == "completed"
    out = capsys.readouterr().out
    assert polls == [0.25] * 3
    for step in (10, 20, 30, 40):
        assert f"step {step} " in out
    assert "eval step 20" in out and "eval_loss 1.7" in out
    assert "run completed" in out and "eval loss 1.1000" in out


def test_watch_command_exit_code_mirrors_the_run(make_run, runs_dir):
    make_run("done", {"status": "completed"}, [train_record(10, 1.0)])
    make_run("broke", {"status": "failed", "diagnosis": "loss is NaN at step 10"}, [train_record(10, float("nan"))])
    cli = [sys.executable, "-m", "peftlab", "watch", "--runs-dir", str(runs_dir), "--interval", "0.1"]
    done = subprocess.run([*cli, "done"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "run completed" in done.stdout
    broke = subprocess.run([*cli, "broke"], capture_output=True, text=True, timeout=60)
    assert broke.returncode == 1 and "run failed: loss is NaN at step 10" in broke.stdout


@pytest.mark.parametrize("unicode", [False, True])
def test_status_line_keeps_step_rate_and_eta_at_60_columns(make_run, unicode):
    """Issue 14 item 8: at 60 columns (and on an ASCII console) the line drops its decorations, never the ETA."""
    records = [train_record(s, 3.0 - s / 50) for s in range(10, 60, 10)]
    run = make_run("alpaca-gemma2-qlora-r64-long-experiment-name", {"status": "running", "max_steps": 100}, records)
    wide = status_line(run, run.summary(), records, age_s=3.0, unicode=unicode, width=200)
    assert run.name in wide and "last log 3s ago" in wide  # nothing dropped where it fits
    rate = steps_per_second(records)
    for width in (59, 40):
        line = status_line(run, run.summary(), records, age_s=3.0, unicode=unicode, width=width)
        assert len(line) <= width, line
        assert "step 50/100 (50%)" in line and f"{rate:.3g} steps/s" in line and f"eta {int(round(50 / rate))}s" in line
        assert line.isascii() or unicode
    assert "loss 2" in status_line(run, run.summary(), records, age_s=3.0, unicode=unicode, width=100)  # before the name
