"""A write the operating system refuses mid-run (full disk, quota, read-only remount, permissions) ends in
one `error:` line naming the file and a fix, status `failed` where the summary can still be written and
`dead` where it cannot, and nothing complete lost (issue 12, item 11)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peftlab import runs
from peftlab.reliability.checkpoints import checkpoints, latest_complete, problem
from peftlab.runs import RunDir, read_jsonl

FIXES = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "disk quota", errno.EROFS: "read-only",
         errno.EACCES: "writable for this user", errno.EIO: "I/O error", errno.EFBIG: "file size limit"}
REFUSED = [errno.ENOSPC, errno.EACCES]  # through a real run; every errno's line: test_each_refusal_has_its_fix


def refuse_metrics_after(monkeypatch: pytest.MonkeyPatch, records: int, code: int, summary_too: bool = False) -> None:
    """From the (records+1)-th metrics line on, the disk refuses: as a write() would, with no file name.
    With `summary_too`, every whole-file write (summary.json) is refused from then on as well."""
    written = []

    def refusing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            if len(written) >= records:
                raise OSError(code, os.strerror(code))
            written.append(file)
        return builtins.open(file, mode, *args, **kwargs)

    original = runs.tempfile.mkstemp

    def refusing_mkstemp(*args, **kwargs):
        if summary_too and len(written) >= records:
            raise OSError(code, os.strerror(code), kwargs.get("dir"))
        return original(*args, **kwargs)

    monkeypatch.setattr(runs, "open", refusing_open, raising=False)
    monkeypatch.setattr(runs.tempfile, "mkstemp", refusing_mkstemp)


def error_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("error") or "Traceback" in line]


@pytest.mark.parametrize("code", REFUSED, ids=[errno.errorcode[c] for c in REFUSED])
def test_a_refused_write_mid_run_is_one_error_line_and_failed(code, runs_dir, fast_sets, cli, monkeypatch):
    refuse_metrics_after(monkeypatch, 1, code)
    code_, lines = cli("train", "tiny-gemma2-dolly", *fast_sets, "--runs-dir", str(runs_dir), "--name", "d")
    run = RunDir(runs_dir / "d")
    assert code_ == 2 and error_lines(lines) == [lines[-1]], lines[-5:]
    assert lines[-1].startswith(f"error: {run.metrics_path}: {os.strerror(code)}; fix: "), lines[-1]
    assert FIXES[code] in lines[-1] and f"peftlab train --resume {run.path}" in lines[-1]
    summary = run.summary()
    assert summary["status"] == "failed" and summary["reason"] == "I/O error" and "metrics.jsonl" in summary["diagnosis"]
    assert [r["step"] for r in read_jsonl(run.metrics_path)] == [2]  # what was written stays whole
    assert run.shown_status() == "failed"


def test_when_the_summary_cannot_be_written_either_the_run_shows_dead(runs_dir, fast_sets, cli, monkeypatch):
    refuse_metrics_after(monkeypatch, 1, errno.EROFS, summary_too=True)
    code, lines = cli("train", "tiny-gemma2-dolly", *fast_sets, "--runs-dir", str(runs_dir), "--name", "ro")
    run = RunDir(runs_dir / "ro")
    assert code == 2 and error_lines(lines) == [lines[-1]], lines[-5:]
    assert "Read-only file system" in lines[-1] and "summary.json could not be updated either" in lines[-1]
    assert run.summary()["status"] == "running"  # the last summary that could be written ...
    assert run.shown_status() == "dead"  # ... and what every listing shows once the process let go


@pytest.mark.parametrize("code", list(FIXES), ids=[errno.errorcode[c] for c in FIXES])
def test_each_refusal_has_its_fix(code, tmp_path):
    run = RunDir(tmp_path / "run")
    line = str(runs.io_error(OSError(code, os.strerror(code), str(run.metrics_path)), run))
    assert line.startswith(f"{run.metrics_path}: {os.strerror(code)}; fix: ") and FIXES[code] in line
    assert line.endswith(f"`peftlab train --resume {run.path}` continues from its last complete checkpoint")
    wrapped = RuntimeError(f"Error while serializing: {os.strerror(code)}")  # as a library rewords it
    found = runs.io_cause(wrapped, tmp_path)
    assert (found is not None and found.errno == code) == (code in runs.IO_WORDING.values())
    assert runs.io_cause(ValueError("not a disk problem"), tmp_path) is None  # the probe write succeeds


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small filesystem (root with CAP_SYS_ADMIN only; the test is skipped elsewhere)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_really_full_disk_during_a_checkpoint(tmp_path, fast_sets, cli):
    """One checkpoint of the tiny twin is ~0.9 MB: the second one fills a 1.5 MB disk halfway through
    (torch.save hides the errno; the run finds out why)."""
    with tmpfs(tmp_path / "disk", "1500k") as disk:
        sets = [*fast_sets, "--set", "train.save_steps=2", "--set", "eval.compare_base=false"]
        code, lines = cli("train", "tiny-gemma2-dolly", *sets, "--runs-dir", str(disk), "--name", "full")
        run = RunDir(disk / "full")
        assert code == 2 and error_lines(lines) == [lines[-1]], lines[-5:]
        assert lines[-1].startswith(f"error: {run.path}: No space left on device; fix: free space on that disk")
        assert run.summary()["status"] == "failed"  # the half-written checkpoint made room for it
        assert [c.name for c in checkpoints(run.checkpoints_path)] == ["checkpoint-2"]
        assert problem(latest_complete(run.checkpoints_path)) is None  # the complete one is kept whole


def test_a_real_read_only_remount_mid_run(tmp_path, fast_sets):
    with tmpfs(tmp_path / "disk", "64m") as disk:
        sets = [*fast_sets, "--set", "train.max_steps=400", "--set", "train.logging_steps=1"]
        proc = subprocess.Popen([sys.executable, "-m", "peftlab", "train", "tiny-gemma2-dolly", *sets, "--runs-dir",
                                 str(disk), "--name", "r"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run = RunDir(disk / "r")
        deadline = time.monotonic() + 240
        while not read_jsonl(run.metrics_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if remount.returncode != 0:
            proc.send_signal(signal.SIGKILL)
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        out = proc.communicate(timeout=300)[0]
        lines = [line for line in out.splitlines() if line.strip()]
        assert proc.returncode == 2 and error_lines(lines) == [lines[-1]], lines[-5:]
        assert "Read-only file system; fix: the filesystem is read-only" in lines[-1], lines[-1]
        assert run.summary()["status"] == "running" and run.shown_status() == "dead"
