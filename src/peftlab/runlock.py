"""Who owns a run folder, and whether the process training a run is still alive.

The process that creates or resumes a run takes an exclusive `flock` on `<run>/.lock` and holds it
until the run has recorded how it ended. The kernel drops a flock when its holder dies, whatever
kills it (SIGKILL, the out-of-memory killer, a crash), so a summary that says `running` beside a
free lock means the process died without recording its end: the run is shown as `dead`. Runs
written before the lock existed fall back to the recorded pid, host and process start time (a pid
reused by another process has another start time).

flock, not fcntl/lockf record locks: a process drops all its record locks on a file when it closes
*any* descriptor of that file, which a status probe in the same process would do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from peftlab.errors import PeftlabError

LOCK_NAME = ".lock"
DEAD = "dead"
# A status probe holds a shared lock for microseconds: a writer retries past it instead of failing.
ACQUIRE_TIMEOUT_S = 2.0


class RunLock:
    """An exclusive flock on a run folder's lock file, held until `release()` (or this object is collected)."""

    def __init__(self, path: Path, handle: IO[bytes]) -> None:
        self.path, self.handle = path, handle

    def release(self) -> None:
        if not self.handle.closed:
            self.handle.close()  # closing the descriptor drops the flock
        if _held.get(self.path) is self:
            del _held[self.path]


# flock is per open file, so a probe from the process that holds the lock would see it as someone
# else's: the locks this process holds are known here (a run created and then resumed in one process,
# as the tests and sweeps do, re-uses its own lock). Weak: a lock dies with the RunDir holding it.
_held: weakref.WeakValueDictionary[Path, RunLock] = weakref.WeakValueDictionary()


def owner() -> dict[str, Any]:
    """pid, host and process start time of this process: what tells it apart from a later one with its pid."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": process_start(os.getpid())}


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where that is not readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22; the command name (field 2) may hold spaces and parentheses, so split after its last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def holds(folder: Path) -> bool:
    """Whether this process holds `folder`'s lock already."""
    return Path(folder).resolve() / LOCK_NAME in _held


def acquire(folder: Path) -> RunLock:
    """Take `folder`'s lock for this process, or raise one line naming the live process that holds it."""
    path = Path(folder).resolve() / LOCK_NAME
    if (mine := _held.get(path)) is not None:
        return mine
    # Read-only: a file held open for writing would keep its filesystem from being remounted read-only.
    handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644), "rb")
    deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            handle.close()
            holder = _read_owner(path)
            raise PeftlabError(
                f"run '{folder}' is still being trained by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}; fix: wait for it to end, or stop it (Ctrl-C or SIGTERM saves a "
                "checkpoint) and then resume it; or train under another --name"
            ) from None
        except OSError:  # a filesystem without locks: the run goes on, liveness falls back to the pid
            break
    path.write_text(json.dumps(owner()))  # through a second descriptor, closed at once; the flock stays
    lock = RunLock(path, handle)
    _held[path] = lock
    return lock


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def lock_held(folder: Path) -> bool | None:
    """Whether some process holds the run's lock; None when the run has no lock file (or it cannot be probed)."""
    path = Path(folder).resolve() / LOCK_NAME
    if path in _held:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return False


def process_alive(summary: dict[str, Any]) -> bool | None:
    """Whether the process recorded in `summary` still runs; None when that cannot be told from here
    (no pid, or another host)."""
    pid, host = summary.get("pid"), summary.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    with contextlib.suppress(PermissionError):  # PermissionError: it exists, owned by another user
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
    started = summary.get("pid_start")
    return started is None or process_start(pid) in (None, started)


def shown_status(folder: Path, summary: dict[str, Any]) -> str | None:
    """The status to show: the summary's, except `dead` for a `running` run whose process is gone."""
    status = summary.get("status")
    if status != "running":
        return status
    held = lock_held(folder)
    if held:
        return status
    # A run trained on another host (a shared folder) may hold a lock this host cannot see: there, only its
    # pid is trusted, and only on its own host.
    if held is False and summary.get("host") in (None, socket.gethostname()):
        return DEAD
    return DEAD if process_alive(summary) is False else status


def dead_reason(folder: Path, summary: dict[str, Any]) -> str:
    """Why a run is shown as dead, and what to do, in one line."""
    who = f"process {summary.get('pid', '?')} on {summary.get('host', '?')}"
    return (f"{who} ended without recording how the run ended (killed: SIGKILL, the out-of-memory killer, "
            f"a reboot or a full disk); fix: `peftlab train --resume {folder}` continues from its last complete "
            "checkpoint, or --overwrite starts it again")


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Held by one process of this machine at a time; the others wait (flock: freed if its holder dies)."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
