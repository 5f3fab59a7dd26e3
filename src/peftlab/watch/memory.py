"""Memory readings in GiB: the CUDA allocator on a GPU, the process's resident set on a CPU."""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def memory_kind() -> str:
    return "cuda_allocator" if torch.cuda.is_available() else "cpu_rss"


def current_memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {
            "mem_allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
            "mem_reserved_gib": round(torch.cuda.memory_reserved() / GIB, 3),
        }
    # Without /proc (macOS), the peak resident set is the closest reading there is.
    rss = _status_kib("VmRSS:") * 1024 if STATUS.exists() else _peak_rss_bytes()
    return {"mem_rss_gib": round(rss / GIB, 3)}


def peak_memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {
            "peak_mem_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_mem_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        }
    return {"peak_mem_rss_gib": round(_peak_rss_bytes() / GIB, 3)}


def reset_peak_memory() -> None:
    """Start a new peak window (per run, so a matrix in one process does not inherit an earlier peak)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif CLEAR_REFS.exists():
        with contextlib.suppress(OSError):
            CLEAR_REFS.write_text("5")  # Linux: resets VmHWM, the peak resident set


def _status_kib(field: str) -> int:
    if STATUS.exists():
        for line in STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _peak_rss_bytes() -> int:
    if STATUS.exists():
        return _status_kib("VmHWM:") * 1024
    # Elsewhere: a process-lifetime peak (KiB on Linux, bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory_all_ranks() -> dict[str, Any]:
    """This process's peak, plus every rank's when several processes train (a collective)."""
    from peftlab.distributed import gather, ranks

    peak: dict[str, Any] = peak_memory()
    if ranks().distributed:
        peak["peak_mem_per_rank"] = gather(peak)
    return peak
