"""The run registry: an SQLite index of the run folders under a runs folder, for `peftlab runs`.

The folders are the truth; the index (runs/.registry.sqlite) is a cache of their summaries. It is
updated when a run starts and ends, reconciled with the folders before every listing (a summary
whose mtime changed is re-read, a vanished folder is dropped), and rebuilt from the folders when it
is missing, from an older schema, or corrupt. WAL mode and a busy timeout let several runs and sweep
trials (threads or processes) write at once; an update never overwrites a newer summary with an
older one, so racing writers converge on what the folders say.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from peftlab.columns import key_metric_text, key_metrics, number, text
from peftlab.errors import PeftlabError, did_you_mean
from peftlab.runlock import DEAD, shown_status
from peftlab.runs import RunDir
from peftlab.watch.console import duration

INDEX_NAME = ".registry.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
SCAN_DEPTH = 3  # runs/<run> and, for sweeps that nest trials, runs/<study>/<trial>
STATUSES = ("running", DEAD, "completed", "failed", "interrupted", "pruned", "unreadable")
SCHEMA = """
CREATE TABLE runs (
    name TEXT PRIMARY KEY,            -- folder path relative to the runs folder
    task TEXT, recipe TEXT, method TEXT, status TEXT,
    started_at TEXT, ended_at TEXT,
    summary_json TEXT NOT NULL,
    summary_mtime_ns INTEGER NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE INDEX runs_started ON runs (started_at);
"""
UPSERT = """
INSERT INTO runs (name, task, recipe, method, status, started_at, ended_at, summary_json, summary_mtime_ns, indexed_at)
VALUES (:name, :task, :recipe, :method, :status, :started_at, :ended_at, :summary_json, :summary_mtime_ns, :indexed_at)
ON CONFLICT (name) DO UPDATE SET
    task = excluded.task, recipe = excluded.recipe, method = excluded.method, status = excluded.status,
    started_at = excluded.started_at, ended_at = excluded.ended_at, summary_json = excluded.summary_json,
    summary_mtime_ns = excluded.summary_mtime_ns, indexed_at = excluded.indexed_at
WHERE excluded.summary_mtime_ns >= runs.summary_mtime_ns
"""


@dataclass
class Entry:
    """One indexed run, as `peftlab runs` lists it."""

    name: str
    task: str | None
    recipe: str | None
    method: str | None
    status: str | None
    started_at: str | None
    ended_at: str | None
    summary: dict[str, Any]

    def runtime_s(self, now: float | None = None) -> float | None:
        """Training time when the run recorded it, else wall time (so far, for a running run)."""
        recorded = number(self.summary.get("runtime_s"))
        if recorded is not None:
            return recorded
        start, end = _parse_time(self.started_at), _parse_time(self.ended_at)
        if end is None and self.status == "running":
            end = now or time.time()
        return None if start is None or end is None else max(end - start, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task, "recipe": self.recipe, "method": self.method,
                "status": self.status, "started_at": self.started_at, "ended_at": self.ended_at,
                "runtime_s": self.runtime_s(), "key_metrics": key_metrics(self.summary)}

    def cells(self) -> list[str]:
        runtime = self.runtime_s()
        return [self.name, text(self.task), text(self.recipe), text(self.method), text(self.status),
                _short_time(self.started_at), "n/a" if runtime is None else duration(runtime) + "+" * (self.status == "running"),
                key_metric_text(key_metrics(self.summary))]


HEADERS = ["name", "task", "recipe", "method", "status", "started", "runtime", "key metric"]


class Registry:
    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self.path = self.runs_dir / INDEX_NAME

    # ------------------------------------------------------------ connection

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection to a healthy index: created, migrated or rebuilt from the folders as needed."""
        if not self.runs_dir.is_dir():
            self.runs_dir.mkdir(parents=True)
        try:
            try:
                conn = self._open()
            except sqlite3.OperationalError:  # locked past the timeout, read-only, no space: not corruption
                raise
            except sqlite3.DatabaseError:  # "file is not a database", "database disk image is malformed"
                self._discard()
                conn = self._open()
            try:
                yield conn
            finally:
                conn.close()
        except sqlite3.OperationalError as exc:
            raise PeftlabError(f"run index '{self.path}' not usable ({exc}); fix: make the runs folder writable, "
                               "or delete the file (it is rebuilt from the run folders)") from None

    def _writable(self) -> bool:
        return os.access(self.runs_dir, os.W_OK) and (not self.path.exists() or os.access(self.path, os.W_OK))

    def _open(self) -> sqlite3.Connection:
        # A read-only runs folder (an archive, a shared mount) is listed from an index built in memory: the folders
        # are the record, the file only a cache.
        where = self.path if self._writable() else ":memory:"
        conn = sqlite3.connect(where, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._initialize(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _initialize(self, conn: sqlite3.Connection) -> None:
        """New or older-schema index: (re)create the table and fill it from the folders, once."""
        with _write(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return  # another process won the race
            conn.execute("DROP TABLE IF EXISTS runs")
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            for run in self.scan():
                conn.execute(UPSERT, _record(self.runs_dir, run))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _discard(self) -> None:
        """A corrupt index is only a cache: drop it (and its WAL files); the next open rebuilds it."""
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    # ------------------------------------------------------------ writes

    def record(self, run: RunDir) -> None:
        """Index one run's current summary (called when a run starts and when it ends)."""
        with self._connect() as conn, _write(conn):
            conn.execute(UPSERT, _record(self.runs_dir, run))

    def forget(self, run: RunDir) -> None:
        """Drop one run whose folder was removed (a run refused before its first step)."""
        with self._connect() as conn, _write(conn):
            conn.execute("DELETE FROM runs WHERE name = ?", (_relative_name(self.runs_dir, run),))

    def sync(self) -> None:
        """Reconcile the index with the folders: re-read changed summaries, add new runs, drop vanished ones."""
        with self._connect() as conn:
            known = dict(conn.execute("SELECT name, summary_mtime_ns FROM runs").fetchall())
            found = {_relative_name(self.runs_dir, run): run for run in self.scan()}
            changed = [run for name, run in found.items() if known.get(name) != _mtime_ns(run)]
            gone = [name for name in known if name not in found]
            if not changed and not gone:
                return
            with _write(conn):
                for run in changed:
                    conn.execute(UPSERT, _record(self.runs_dir, run))
                for name in gone:  # re-checked under the write lock: it may have been created since the scan
                    if not (self.runs_dir / name / "config.yaml").exists():
                        conn.execute("DELETE FROM runs WHERE name = ?", (name,))

    def rebuild(self) -> None:
        """Forget the index and fill it again from the folders."""
        self._discard()
        with self._connect():
            pass

    # ------------------------------------------------------------ reads

    def scan(self) -> list[RunDir]:
        """Run folders (those with a config.yaml) under the runs folder; hidden folders are skipped."""
        runs: list[RunDir] = []
        _walk(self.runs_dir, SCAN_DEPTH, runs)
        return runs

    def query(self, task: str | None = None, recipe: str | None = None, method: str | None = None,
              status: str | None = None) -> list[Entry]:
        """Indexed runs, newest first, filtered by exact task/recipe/method/status. A run indexed as
        `running` whose process is gone is `dead`: that is decided now, from its lock, not from the index."""
        if status is not None and status not in STATUSES:
            raise PeftlabError(f"--status '{status}': unknown; {did_you_mean(status, STATUSES)}")
        filters = {k: v for k, v in (("task", task), ("recipe", recipe), ("method", method)) if v}
        if status:
            filters["status"] = "running" if status == DEAD else status
        where = " AND ".join(f"{k} = :{k}" for k in filters) or "1"
        sql = (f"SELECT name, task, recipe, method, status, started_at, ended_at, summary_json FROM runs "
               f"WHERE {where} ORDER BY started_at DESC, name")
        with self._connect() as conn:
            rows = conn.execute(sql, filters).fetchall()
        entries = []
        for row in rows:
            summary = json.loads(row[7])
            entry = Entry(row[0], *row[1:4], shown_status(self.runs_dir / row[0], summary), *row[5:7], summary=summary)
            if status is None or entry.status == status:
                entries.append(entry)
        return entries


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock up front (waiting up to the busy timeout)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _walk(folder: Path, depth: int, out: list[RunDir]) -> None:
    if depth == 0 or not folder.is_dir():
        return
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if (child / "config.yaml").exists():
            out.append(RunDir(child))
        else:
            _walk(child, depth - 1, out)


def _relative_name(runs_dir: Path, run: RunDir) -> str:
    return run.path.relative_to(runs_dir).as_posix()


def _mtime_ns(run: RunDir) -> int:
    try:
        return run.summary_path.stat().st_mtime_ns
    except OSError:
        return -1


def _read_summary(run: RunDir) -> dict[str, Any]:
    """The summary, or a stand-in saying it is unreadable (a hand-edited or half-copied folder)."""
    try:
        summary = run.summary()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"status": "unreadable"}
    return summary if isinstance(summary, dict) else {"status": "unreadable"}


def _record(runs_dir: Path, run: RunDir) -> dict[str, Any]:
    mtime = _mtime_ns(run)  # before the read: a summary replaced in between is re-read by the next sync
    summary = _read_summary(run)
    return {"name": _relative_name(runs_dir, run), "task": summary.get("task"), "recipe": summary.get("recipe"),
            "method": summary.get("method"), "status": summary.get("status"),
            "started_at": summary.get("started_at"), "ended_at": summary.get("ended_at"),
            "summary_json": json.dumps(summary), "summary_mtime_ns": mtime, "indexed_at": time.time()}


def registry_for(run: RunDir) -> Registry:
    """The index a run belongs to: the outermost enclosing folder within the scan depth that has one (a sweep
    nests trials as runs/<study>/<trial>, listed by `peftlab runs --runs-dir runs`), else the run's parent."""
    for folder in reversed(run.path.parents[:SCAN_DEPTH]):
        if (folder / INDEX_NAME).is_file():
            return Registry(folder)
    return Registry(run.path.parent)


def index_run(run: RunDir) -> None:
    """Best effort, for the runner: a registry problem is reported, never allowed to fail a training run."""
    try:
        registry_for(run).record(run)
    except (sqlite3.Error, OSError, PeftlabError) as exc:
        from peftlab.watch.console import say

        say(f"warning: run registry not updated ({exc.__class__.__name__}: {exc}); `peftlab runs` rebuilds it from the folders")


def forget_run(run: RunDir) -> None:
    """Best effort, as index_run: `peftlab runs` also drops a vanished folder on its next sync."""
    with contextlib.suppress(sqlite3.Error, OSError, PeftlabError):
        registry_for(run).forget(run)


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _short_time(text: str | None) -> str:
    stamp = _parse_time(text)
    return "n/a" if stamp is None else datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")
