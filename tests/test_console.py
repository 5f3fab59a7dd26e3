"""The CLI never crashes on a console that cannot encode Unicode (one original run died on a check mark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENCODINGS = ["gbk", "ascii"]


def peftlab(encoding: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": encoding, "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, timeout=300, env=env)
    # Decode as the console would; what it cannot encode must have been replaced, not raised.
    proc.stdout, proc.stderr = proc.stdout.decode(encoding), proc.stderr.decode(encoding)
    assert "UnicodeEncodeError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_say_and_tables_survive_a_check_mark(encoding):
    code = ("from peftlab.watch.console import print_table, say; say('saved \\u2713 \\u2014 \\u4e2d\\u6587'); "
            "print_table(['ok'], [['\\u2713']], title='\\u2713')")
    env = {**os.environ, "PYTHONIOENCODING": encoding, "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr.decode(encoding, "replace")
    assert proc.stdout.decode(encoding).startswith("saved ? ")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cli_recipes_train_compare_on_a_narrow_console(encoding, tmp_path, fast_sets):
    listing = peftlab(encoding, "recipes").stdout
    assert "tiny-gemma2-dolly" in listing and "gemma2-dolly" in listing
    runs = tmp_path / "runs \u2713 \u4e2d\u6587"  # printed in "run folder: ..." lines
    trained = peftlab(encoding, "train", "tiny-gemma2-dolly", *fast_sets, "--set", "train.max_steps=2",
                      "--set", "train.logging_steps=1", "--runs-dir", str(runs), "--name", encoding)
    assert any(line.startswith("run folder: ") for line in trained.stdout.splitlines())
    assert any(line.startswith("step 2 ") for line in trained.stdout.splitlines())
    assert json.loads((Path(runs) / encoding / "summary.json").read_text())["status"] == "completed"
    compared = peftlab(encoding, "compare", encoding, "--runs-dir", str(runs)).stdout
    assert encoding in compared and "completed" in compared


def test_an_epoch_record_is_its_own_line_not_a_step_of_dashes() -> None:
    from peftlab.watch.console import format_record

    # `peftlab watch` replayed this record as `step 4  epoch 0.10  loss -  grad_norm -  lr -  tok/s 279  mem - GiB`
    record = {"kind": "epoch", "epoch": 0.0952, "step": 4, "epoch_time_s": 3.383, "eval_time_s": 0.0,
              "samples_per_s": 18.921, "tokens_per_s": 279.08, "padded_tokens_per_s": 756.82, "peak_mem_rss_gib": 0.645}
    assert format_record(record) == "epoch 0.0952: 3.4 s (0.0 s eval), 279 real / 757 padded tokens/s, peak 0.645 GiB"
