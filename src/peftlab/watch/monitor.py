"""The monitor: one JSON line per logging step in metrics.jsonl, a progress bar, and the guard.

Throughput is counted from the batches the training loop actually consumed (see `BatchCounter`),
not from the dataloader, which prefetches one batch ahead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from peftlab.distributed import sum_over_ranks
from peftlab.runs import RunDir
from peftlab.watch.console import Progress
from peftlab.watch.guard import HealthGuard
from peftlab.watch.memory import current_memory


@dataclass
class BatchCounter:
    """Totals over consumed micro-batches (filled by the trainer's training_step).

    Sums of GPU tensors stay on the GPU until `snapshot()`: turning each micro-batch's count into a
    Python int forces a host sync, which cost up to 20% on Banking77's short steps (bench/README.md).
    Snapshots are taken when the monitor logs, where the Trainer syncs anyway."""

    samples: Any = 0
    tokens: Any = 0  # real, non-padding tokens
    padded_tokens: Any = 0
    trained_tokens: Any = 0

    def add(self, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        if "attention_mask" in inputs:
            self.tokens += inputs["attention_mask"].sum()
            self.samples += ids.shape[0]
        else:  # padding-free: one packed row, sequences start where position_ids == 0
            self.tokens += ids.numel()
            self.samples += (inputs["position_ids"] == 0).sum() if "position_ids" in inputs else ids.shape[0]
        self.padded_tokens += ids.numel()
        self.trained_tokens += self.trained_in(inputs["labels"])

    @staticmethod
    def trained_in(labels: Any) -> Any:
        """Label positions the loss sees: a causal LM predicts token t+1 from t, so the first never counts."""
        return (labels[..., 1:] != -100).sum()

    def snapshot(self) -> BatchCounter:
        """The totals as plain ints."""
        return BatchCounter(**{k: int(v) for k, v in vars(self).items()})

    def as_dict(self) -> dict[str, int]:
        return vars(self.snapshot())

    def total(self) -> BatchCounter:
        """The snapshot summed over all ranks of a multi-process run (a collective: every rank calls it)."""
        own = self.snapshot()
        return BatchCounter(*sum_over_ranks([own.samples, own.tokens, own.padded_tokens, own.trained_tokens]))


class MonitorCallback(TrainerCallback):
    def __init__(self, run: RunDir, counter: BatchCounter, guard: HealthGuard | None, progress: Progress) -> None:
        self.run, self.counter, self.guard, self.progress = run, counter, guard, progress
        self.start = self.last_time = time.perf_counter()
        self.last = BatchCounter()
        self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last = self.counter.total()
        self.last_step = state.global_step
        self.run.update_summary(max_steps=state.max_steps)  # `peftlab watch` computes its ETA from it
        self.progress.start(total=state.max_steps, done=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.advance(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            trained_before = self.last.trained_tokens
            record = self._train_record(state, logs)
            self.run.append_metrics(record)
            self.progress.log(record)
            if self.guard:  # the label tokens trained in this window tell a converged 0.0 from an all-masked one
                self.guard.check_log(state.global_step, {**logs, "trained_tokens": self.last.trained_tokens - trained_before})
        elif "eval_loss" in logs:
            record = {"kind": "eval", "step": state.global_step, "epoch": state.epoch, "time": self._elapsed()}
            record.update({k: v for k, v in logs.items() if k.startswith("eval_")})
            self.run.append_metrics(record)
            self.progress.log(record)

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.stop()

    def _elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    def _train_record(self, state, logs: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        dt = max(now - self.last_time, 1e-9)
        c, last = self.counter.total(), self.last
        record = {
            "kind": "train",
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs.get("loss"),
            "grad_norm": logs.get("grad_norm"),
            "lr": logs.get("learning_rate"),
            "tokens": c.tokens,
            "padded_tokens": c.padded_tokens,
            "samples": c.samples,
            "tokens_per_s": round((c.tokens - last.tokens) / dt, 2),
            "padded_tokens_per_s": round((c.padded_tokens - last.padded_tokens) / dt, 2),
            "samples_per_s": round((c.samples - last.samples) / dt, 3),
            "steps_per_s": round((state.global_step - self.last_step) / dt, 4),
            **current_memory(),
            "time": round(now - self.start, 3),
        }
        self.last_time, self.last_step = now, state.global_step
        self.last = c
        return record
