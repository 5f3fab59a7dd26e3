"""The hooks every engine's loop calls: the one place where a training run is observed.

A record at a logging step goes to metrics.jsonl, the health guard, the progress bar and tracking (W&B);
an evaluation record goes to metrics.jsonl, the progress bar, tracking and the listeners (a sweep's pruner),
which may ask the loop to stop. Plain methods, no framework: the hf engine adapts them through a
TrainerCallback (engines/hf.py), any other loop calls them directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from peftlab.distributed import broadcast, gather
from peftlab.errors import GuardFailure
from peftlab.runs import RunDir
from peftlab.tracking import Trackers
from peftlab.watch.guard import HealthGuard
from peftlab.watch.memory import current_memory
from peftlab.watch.progress import Progress

if TYPE_CHECKING:
    from peftlab.engines import TrainJob


class Counter(Protocol):
    """Totals over consumed micro-batches (watch/monitor.py's BatchCounter for token tasks)."""

    def add(self, batch: dict[str, Any]) -> None: ...

    def total(self) -> Any: ...  # totals summed over ranks, as plain ints (a collective), with rates_since(last, s)

    def as_dict(self) -> dict[str, int]: ...

    def summary(self, runtime: float) -> dict[str, Any]: ...  # summary fields of the whole run


class Listener(Protocol):
    """Something that follows a run (a sweep's pruner, the demo's accuracy before training): `job_ready` sees the
    built model before any step (peftlab/training.py calls it), `evaluated` returns True to stop training."""

    def job_ready(self, job: TrainJob) -> None: ...

    def train_begun(self) -> None: ...

    def evaluated(self, step: int, metrics: dict[str, Any]) -> bool: ...

    def train_ended(self) -> None: ...


class TrainingHooks:
    def __init__(self, run: RunDir, counter: Counter, guard: HealthGuard | None, progress: Progress,
                 tracker: Trackers, listeners: Sequence[Listener] = (), carried: dict[str, Any] | None = None) -> None:
        """`carried`: what `carry()` put in the checkpoint a resumed run starts from (counter restored by the caller)."""
        self.run, self.counter, self.guard, self.progress, self.tracker = run, counter, guard, progress, tracker
        self.listeners = list(listeners)
        carried = carried or {}
        self.seconds_before = carried.get("runtime_s", 0.0)  # training time of the run's earlier sessions (resume)
        self.logged = carried.get("logged")  # the logging window open at the checkpoint: where the next record starts
        if guard and "guard" in carried:
            guard.restore(carried["guard"])
        self.start = self.last_time = time.perf_counter()
        self.last: Any = None
        self.last_step = 0
        self.stop_requested = False

    # ------------------------------------------------------------ the loop's calls

    def train_begin(self, max_steps: int, step: int = 0) -> None:
        self.start = self.last_time = time.perf_counter()
        logged, self.logged = self.logged, None
        # A resumed run's first record covers the steps since the last log, as the uninterrupted run's does.
        self.last = type(self.counter)(**logged["totals"]) if logged else self.counter.total()
        self.last_step = logged["step"] if logged else step
        self.run.update_summary(max_steps=max_steps)  # `peftlab watch` computes its ETA from it
        self.progress.start(total=max_steps, done=step)
        for listener in self.listeners:
            listener.train_begun()

    def micro_batch(self, batch: dict[str, Any]) -> None:
        """One micro-batch the loop trains on (not what a dataloader prefetched)."""
        self.counter.add(batch)

    def step_end(self, step: int) -> None:
        self.progress.advance(step)

    def log_train(self, step: int, epoch: float, loss: float | None, grad_norm: float | None, lr: float | None,
                  **extra: Any) -> dict[str, Any]:
        """A logging step: the record in metrics.jsonl, on the console and in tracking; then the guard (raises
        GuardFailure on a broken run)."""
        now = time.perf_counter()
        dt = max(now - self.last_time, 1e-9)
        totals = self.counter.total()
        record = {"kind": "train", "step": step, "epoch": round(epoch or 0.0, 4), "loss": loss,
                  "grad_norm": grad_norm, "lr": lr, **totals.rates_since(self.last, dt),
                  "steps_per_s": round((step - self.last_step) / dt, 4), **extra, **current_memory(),
                  "time": round(now - self.start, 3)}
        last, self.last_time, self.last_step, self.last = self.last, now, step, totals
        self._emit(record)
        if self.guard:  # the label tokens trained in this window tell a converged 0.0 from an all-masked one
            trained = getattr(totals, "trained_tokens", None)  # token tasks count them; images have none
            window = {} if trained is None else {"trained_tokens": trained - last.trained_tokens}
            self._check_health(step, {**record, **window})
        return record

    def _check_health(self, step: int, logs: dict[str, Any]) -> None:
        """The guard's decision, rank 0's on every rank (one broadcast per logging step). The ranks read the same
        reduced loss and so decide alike; this makes it certain, for a rank that stopped alone would leave the
        others waiting in their next collective forever."""
        failure = None
        try:
            self.guard.check_log(step, logs)
        except GuardFailure as exc:
            failure = exc
        message = broadcast(None if failure is None else str(failure))
        if message is not None:
            raise GuardFailure(message, every_rank=True)

    def log_eval(self, step: int, epoch: float | None, metrics: dict[str, Any]) -> dict[str, Any]:
        """An evaluation (eval_* metrics): recorded, then shown to the listeners, which may stop training."""
        record = {"kind": "eval", "step": step, "epoch": epoch, "time": round(time.perf_counter() - self.start, 3)}
        record.update({k: v for k, v in metrics.items() if k.startswith("eval_")})
        self._emit(record)
        for listener in self.listeners:
            self.stop_requested |= bool(listener.evaluated(step, metrics))
        return record

    def should_stop(self) -> bool:
        """A listener asked to end training now (the run still completes, with what it has)."""
        return self.stop_requested

    def train_end(self) -> None:
        self.progress.stop()
        for listener in self.listeners:
            listener.train_ended()

    # ------------------------------------------------------------ for checkpoints and the summary

    def runtime(self) -> float:
        """Training seconds of the whole run, earlier sessions included."""
        return self.seconds_before + time.perf_counter() - self.start

    def carry(self, every_rank: bool = False) -> dict[str, Any]:
        """What a checkpoint must carry for a resumed run to go on as the uninterrupted one: counters, training
        time, the open logging window (totals and step at the last record) and the guard's history.
        `every_rank`: every rank calls it (a collective), and each rank's own counters travel too
        (`counter_per_rank`: each rank counts the micro-batches it trained; the totals are their sum)."""
        logged = {"step": self.last_step, "totals": self.last.as_dict()} if self.last is not None else None
        own = self.counter.as_dict()
        return {"counter": own, **({"counter_per_rank": gather(own)} if every_rank else {}),
                "runtime_s": self.runtime(), "logged": logged, **({"guard": self.guard.carry()} if self.guard else {})}

    def _emit(self, record: dict[str, Any]) -> None:
        self.run.append_metrics(record)
        self.progress.log(record)
        self.tracker.log(record)
