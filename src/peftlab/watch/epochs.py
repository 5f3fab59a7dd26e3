"""Per-epoch records in metrics.jsonl (kind=epoch): wall time, time spent evaluating, real and padded
tokens/s over the training time, and the epoch's peak memory.

Tokens come from the same BatchCounter the monitor uses (consumed micro-batches only). Evaluations
inside an epoch are timed by the Trainer (`eval_runtime`) and taken out of the training time, so
tokens/s means training speed whatever the evaluation frequency.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from peftlab.runs import RunDir
from peftlab.watch.console import format_record, say
from peftlab.watch.memory import peak_memory, reset_peak_memory
from peftlab.watch.monitor import BatchCounter


class EpochCallback(TrainerCallback):
    def __init__(self, run: RunDir, counter: BatchCounter) -> None:
        self.run, self.counter = run, counter
        self.peaks: dict[str, float] = {}  # the run's peak: the max over epochs (each epoch resets the window)
        self._start = time.perf_counter()
        self._eval_s = 0.0
        self._seen = BatchCounter()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start, self._eval_s = time.perf_counter(), 0.0
        self._seen = self.counter.total()
        reset_peak_memory()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._eval_s += float((metrics or {}).get("eval_runtime", 0.0))

    def on_epoch_end(self, args, state, control, **kwargs):
        wall = time.perf_counter() - self._start
        train_s = max(wall - self._eval_s, 1e-9)
        c, seen = self.counter.total(), self._seen
        peak = peak_memory()
        self.peaks = {k: max(v, self.peaks.get(k, 0.0)) for k, v in peak.items()}
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": round(state.epoch or 0.0, 4),
            "step": state.global_step,
            "epoch_time_s": round(wall, 3),
            "eval_time_s": round(self._eval_s, 3),
            "samples_per_s": round((c.samples - seen.samples) / train_s, 3),
            "tokens_per_s": round((c.tokens - seen.tokens) / train_s, 2),
            "padded_tokens_per_s": round((c.padded_tokens - seen.padded_tokens) / train_s, 2),
            **peak,
        }
        self.run.append_metrics(record)
        say(format_record(record))

    def peak_memory(self) -> dict[str, float]:
        """The run's peak so far: the epochs' peaks and the window since the last epoch began."""
        return {k: max(v, self.peaks.get(k, 0.0)) for k, v in peak_memory().items()}
