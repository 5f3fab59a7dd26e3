"""The run folder: config.yaml, metrics.jsonl, summary.json, adapter/, samples/, checkpoints/.

Every whole-file write goes to a temporary file in the same folder and is renamed into place, so a
crash never leaves a half-written summary or config. metrics.jsonl is appended one flushed line at a
time; readers skip a torn last line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.secrets import redact

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "diffusers", "peftlab")


def _file_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 less the umask (mkstemp's 0o600 would hide a run's
    results from the teammates the umask lets read them)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file + rename; secrets (tokens, API keys) are redacted on the way."""
    text = redact(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Fill a temporary sibling folder, then swap it in: a crash never leaves a half-written adapter/."""
    tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: store them as strings so readers see exactly what happened."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line (a crash mid-write) is skipped, not fatal."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def sanitize_name(name: str) -> str:
    """A run name that stays inside the runs folder: no separators, no '..', no absolute paths."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", redact(name)).strip(".-")
    if not cleaned:
        raise PeftlabError(f"run name '{name}' has no usable characters; fix: use letters, digits, '.', '_' or '-'")
    return cleaned[:120]


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "versions": versions,
        "git_sha": _git_sha(),
    }


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


@dataclass
class RunDir:
    path: Path
    # False on the non-zero ranks of a multi-process run: they train, rank 0 writes the folder.
    writer: bool = True

    @property
    def name(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    adapter_path = property(lambda self: self.path / "adapter")
    samples_path = property(lambda self: self.path / "samples")
    checkpoints_path = property(lambda self: self.path / "checkpoints")

    @classmethod
    def create(cls, runs_dir: Path, name: str, recipe: Recipe, overwrite: bool = False) -> RunDir:
        path = Path(runs_dir) / sanitize_name(name)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                status = cls(path).summary().get("status", "unknown")
                resume = "" if status == "completed" else f"--resume {path.name} to continue it, "
                raise PeftlabError(
                    f"run folder '{path}' already holds a run (status {status}); fix: {resume}"
                    "--overwrite to replace it, or --name NEW"
                )
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_text(run.config_path, recipe.to_yaml())
        run.write_summary({"status": "running", "started_at": _now(), "config_hash": recipe.config_hash()})
        return run

    def append_metrics(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(redact(json.dumps(json_safe(record))) + "\n")
            fh.flush()

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def summary(self) -> dict[str, Any]:
        if not self.summary_path.exists():
            return {}
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def write_summary(self, data: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.summary_path, data)

    def update_summary(self, **fields: Any) -> dict[str, Any]:
        data = {**self.summary(), **fields}
        self.write_summary(data)
        return data


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def finish_fields(status: str, reason: str | None = None) -> dict[str, Any]:
    return {"status": status, "reason": reason, "ended_at": _now()}


def open_run(ref: str, runs_dir: Path) -> RunDir:
    """A run by folder path or by name under runs_dir."""
    for candidate in (Path(ref), Path(runs_dir) / ref):
        if (candidate / "config.yaml").exists():
            return RunDir(candidate)
    raise PeftlabError(f"run '{ref}' not found (no config.yaml in '{ref}' or '{Path(runs_dir) / ref}'); fix: see `peftlab runs` or pass the folder")
