"""The run folder: config.yaml, metrics.jsonl, summary.json, adapter/, samples/, checkpoints/.

Every whole-file write goes to a temporary file in the same folder and is renamed into place, so a
crash never leaves a half-written summary or config. metrics.jsonl is appended one flushed line at a
time; readers skip a torn last line.
"""

from __future__ import annotations

import contextlib
import errno
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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any

import yaml

from peftlab import runlock
from peftlab.config import Recipe
from peftlab.errors import PeftlabError
from peftlab.secrets import redact, redact_recipe

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "diffusers", "peftlab")


def _file_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 less the umask (mkstemp's 0o600 would hide a run's
    results from the teammates the umask lets read them)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def honour_umask(path: Path) -> None:
    """Give `path` (a file, or every file under a folder) the mode a plain open() would: safetensors' save_file,
    which peft, transformers and our checkpoints write weights with, creates its files 0o600 whatever the umask."""
    mode = _file_mode()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        if file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def atomic_write_text(path: Path, text: str, redacted: bool = False) -> None:
    """Write via a temporary file + rename; secrets (tokens, API keys) are redacted on the way, unless the
    caller has `redacted` the text itself (a recipe: see secrets.redact_recipe)."""
    text = text if redacted else redact(text)
    with naming(path):
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
def naming(path: Path) -> Iterator[None]:
    """An OSError raised while writing `path` names it: write() and fsync() failures carry no file name."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


# What to do about a write that the operating system refused, by errno.
IO_FIXES = {
    errno.ENOSPC: "free space on that disk (`df -h`) or point --runs-dir at another one",
    errno.EDQUOT: "free space within your disk quota (`quota -s`) or point --runs-dir at another disk",
    errno.EROFS: "the filesystem is read-only (remounted after an error?): remount it read-write, or use another --runs-dir",
    errno.EACCES: "make the folder writable for this user (chmod/chown), or use another --runs-dir",
    errno.EPERM: "make the folder writable for this user (chmod/chown), or use another --runs-dir",
    errno.EIO: "the disk reported an I/O error: check it (`dmesg`), or use another --runs-dir",
    errno.EFBIG: "a file size limit was hit (`ulimit -f`, or the filesystem's maximum file size): raise it",
}


# How libraries that wrap the OSError (torch.save, safetensors) word the same failures.
IO_WORDING = {"No space left on device": errno.ENOSPC, "StorageFull": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
              "Read-only file system": errno.EROFS, "ReadOnlyFilesystem": errno.EROFS}


@contextlib.contextmanager
def writing_output(path: Path, option: str) -> Iterator[None]:
    """An output the user named (-o, PATH): missing parent folders are made, as `mkdir -p` would, by every verb
    alike; a path that cannot be written (a file where a folder should be, no permission, a full disk) is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        where = Path(exc.filename or path.parent)
        if not where.absolute().is_relative_to(path.parent.absolute()):  # not a write of this output
            raise
        why = ("a file is in the way of a folder" if exc.errno in (errno.EEXIST, errno.ENOTDIR)
               else exc.strerror or exc.__class__.__name__)
        raise PeftlabError(f"{option} {path}".strip() + f": cannot write {where} ({why}); "
                           "fix: choose a path in a folder you can write to") from None


def io_cause(exc: BaseException, folder: Path) -> OSError | None:
    """The operating-system write failure behind `exc` (itself, its cause, or in a wrapping library's
    message), or None when `exc` is not one. torch.save hides the errno ("file write failed", "unexpected
    pos ..."): then a probe write in `folder` finds out whether, and why, the disk refuses."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in IO_FIXES:
            return seen
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    text = str(exc)
    for words, code in IO_WORDING.items():
        if words in text:
            return OSError(code, os.strerror(code))
    try:
        atomic_write_text(folder / ".write-probe", "x")
        (folder / ".write-probe").unlink(missing_ok=True)
    except OSError as probe:
        return OSError(probe.errno, probe.strerror, str(folder)) if probe.errno in IO_FIXES else None
    return None


def io_error(exc: OSError, run: RunDir | None = None) -> PeftlabError:
    """One line for a write the operating system refused: the file, the reason, the fix, and how to go on."""
    where = exc.filename or (run.path if run else "the run folder")
    why = exc.strerror or str(exc) or exc.__class__.__name__
    fix = IO_FIXES.get(exc.errno, "make the run folder writable, or use another --runs-dir")
    then = f"; then `peftlab train --resume {run.path}` continues from its last complete checkpoint" if run else ""
    return PeftlabError(f"{where}: {why}; fix: {fix}{then}")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Fill a temporary sibling folder, then swap it in: a crash never leaves a half-written adapter/."""
    tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    with naming(path):
        tmp.mkdir(parents=True)
        try:
            yield tmp
            honour_umask(tmp)
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


def _usable(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")


def sanitize_name(name: str) -> str:
    """A run name that stays inside the runs folder: no separators, no '..', no absolute paths."""
    cleaned = _usable(redact(name))
    if not cleaned:
        raise PeftlabError(f"run name '{name}' has no usable characters; fix: use letters, digits, '.', '_' or '-'")
    return cleaned[:120]


def check_name(name: str | None, option: str) -> str | None:
    """A run or study name given on the command line: one folder inside --runs-dir. A path (`../x`, `a/b`) would
    leave the runs folder or hide the run where `peftlab runs` does not look: refused, not silently rewritten."""
    if name is not None and ("/" in name or "\\" in name or name.strip(".") == ""):
        last = PurePath(name.replace("\\", "/")).name.strip(".") or "NAME"
        raise PeftlabError(f"{option} '{name}': a run name is one folder inside --runs-dir, not a path; fix: "
                           f"{option} {last}, and --runs-dir DIR for the folder it goes in")
    return name


def output_folder(output_dir: str, one_run: bool) -> Path:
    """A recipe's output_dir as a folder: for one run (`train`) the run folder, whose last part must be a usable
    run name (it is not rewritten: the run lands exactly there); else a folder of runs. `~` is the home folder.
    Errors (PeftlabError): `output_dir: ...; fix: ...` for a value naming no folder, an unusable run name, or a
    file where the folder (or one above it) should be."""
    folder = Path(output_dir.strip()).expanduser()
    if not output_dir.strip() or (one_run and folder.name.strip(".") == ""):
        raise PeftlabError(f"output_dir: '{output_dir}' names no {'run ' if one_run else ''}folder; fix: a folder path "
                           "such as out/my-run, or remove output_dir (the run goes to <--runs-dir>/<--name>)")
    if one_run and _usable(folder.name) != folder.name:
        usable = _usable(folder.name) or "my-run"
        raise PeftlabError(f"output_dir: '{output_dir}': its last part is the run's name and may hold only letters, "
                           f"digits, '.', '_' and '-'; fix: output_dir: {folder.parent / usable}")
    blocked = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise PeftlabError(f"output_dir: '{output_dir}': {blocked} is a file, not a folder; fix: point output_dir at a "
                           "folder (new or a run's), or move that file")
    return folder


@dataclass(frozen=True)
class Placement:
    """Where a verb puts its runs: `runs_dir`/`name` (name None = the default run name, or a matrix's prefix)."""

    runs_dir: Path
    name: str | None
    note: str | None = None  # set when command-line flags beat the recipe's output_dir


def place(output_dir: str | None, runs_dir: Path | None, name: str | None, default_runs: Path,
          one_run: bool) -> Placement:
    """The recipe's output_dir against the flags given (`runs_dir`/`name` None = not given). HF's Trainer writes one
    run into output_dir and its hyperparameter_search each trial into output_dir/run-N: so `train` (`one_run`) runs
    into output_dir itself, and `matrix`/`sweep` take it as their runs folder (a folder per run or trial under
    it, as under --runs-dir). Flags win: --runs-dir (and --name for one run) replace output_dir whole."""
    flags = [flag for flag, value in (("--runs-dir", runs_dir), ("--name", name if one_run else None)) if value is not None]
    if output_dir is None or flags:
        runs_dir = runs_dir or default_runs
        where = runs_dir / name if one_run and name else runs_dir
        note = (f"note: the recipe's output_dir '{output_dir}' is overridden by {' and '.join(flags)}: "
                f"{'the run goes to' if one_run else 'the runs go in'} {where}") if output_dir is not None else None
        return Placement(runs_dir, name, note)
    folder = output_folder(output_dir, one_run)
    return Placement(folder.parent, folder.name) if one_run else Placement(folder, name)


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
    # Held by the process that writes this run, from creation (or resume) until its end is recorded.
    lock: runlock.RunLock | None = field(default=None, compare=False, repr=False)

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
        """A new run folder, locked for this process. Racing creators of one name (or a live run of that
        name) meet at the folder's lock: one wins, the others get one error line."""
        path = Path(runs_dir) / sanitize_name(name)
        config = yaml.safe_dump(redact_recipe(recipe.to_dict()), sort_keys=False, allow_unicode=True)
        with naming(path):
            path.mkdir(parents=True, exist_ok=True)
        fresh = not runlock.holds(path)
        run = cls(path, lock=runlock.acquire(path))
        try:
            if any(p.name != runlock.LOCK_NAME for p in path.iterdir()):
                if not overwrite:
                    raise run._taken()
                _empty(path, keep=runlock.LOCK_NAME)
            atomic_write_text(run.config_path, config, redacted=True)
            # output_dir is where the run asked to be, not what it trains: here, not in config.yaml or config_hash
            where = {"output_dir": recipe.output_dir} if recipe.output_dir else {}
            run.write_summary({"status": "running", "started_at": _now(), "config_hash": recipe.config_hash(), **where})
        except BaseException:
            if fresh:  # a lock this process held before (another RunDir of it) stays held
                run.release()
            raise
        return run

    def _taken(self) -> PeftlabError:
        """Why this non-empty folder does not become a new run without --overwrite, and what to do instead."""
        if not self.config_path.exists():  # not a run: files of the user's own (an output_dir pointed at them)
            return PeftlabError(f"run folder '{self.path}' holds files that are not a run; fix: another folder "
                                "(--name NEW, or the recipe's output_dir), or --overwrite to delete them")
        status = self.summary().get("status", "unknown")
        status = runlock.DEAD if status == "running" else status  # we hold its lock: nobody trains it
        resume = "" if status == "completed" else f"--resume {self.path.name} to continue it, "
        return PeftlabError(f"run folder '{self.path}' already holds a run (status {status}); fix: {resume}"
                            "--overwrite to replace it, or --name NEW")

    def release(self) -> None:
        """Give up the run's lock: from now on, a `running` summary means the run died."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def append_metrics(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with naming(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as fh:
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

    def shown_status(self) -> str | None:
        """The summary's status, or `dead` for a run that says `running` but whose process is gone."""
        return runlock.shown_status(self.path, self.summary())


def _empty(folder: Path, keep: str) -> None:
    """Delete everything in `folder` except the file `keep` (the lock we hold)."""
    for child in folder.iterdir():
        if child.name == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def finish_fields(status: str, reason: str | None = None) -> dict[str, Any]:
    return {"status": status, "reason": reason, "ended_at": _now()}


def open_run(ref: str, runs_dir: Path) -> RunDir:
    """A run by folder path or by name under runs_dir."""
    for candidate in _candidates(ref, runs_dir):
        if (candidate / "config.yaml").exists():
            return RunDir(candidate)
    raise PeftlabError(f"run '{ref}' not found ({where_looked(ref, runs_dir)}); fix: see `peftlab runs` or pass the folder")


def _candidates(ref: str, runs_dir: Path) -> list[Path]:
    return list(dict.fromkeys((Path(ref), Path(runs_dir) / ref)))  # an absolute ref is both: name it once


def where_looked(ref: str, runs_dir: Path) -> str:
    """`no config.yaml in 'a' or 'runs/a'`: the folders open_run tried, each once."""
    return "no config.yaml in " + " or ".join(f"'{c}'" for c in _candidates(ref, runs_dir))
