"""The engine seam: which engine runs a job, one-line refusals, and the hooks any engine's loop calls."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from peftlab import engines
from peftlab.config import TrackingConfig, load_recipe, with_overrides
from peftlab.engines import TrainJob, resolve_engine
from peftlab.engines.hooks import TrainingHooks
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.runs import RunDir
from peftlab.tracking import start_trackers
from peftlab.watch.guard import Divergence, HealthGuard, RunContext
from peftlab.watch.monitor import BatchCounter
from peftlab.watch.progress import Progress


class Refusing:
    name = "refusing"

    @classmethod
    def supports(cls, job: TrainJob) -> str | None:
        return "needs a CUDA GPU"


class Accepting:
    name = "accepting"

    @classmethod
    def supports(cls, job: TrainJob) -> str | None:
        return None


def job(loss_kind: str = "causal_lm") -> TrainJob:
    recipe = load_recipe("tiny-gemma2-dolly")
    return TrainJob(None, None, [], None, loss_kind, recipe.train, 0, "fp32", Path("checkpoints"))


def test_auto_takes_the_highest_ranked_engine_that_supports_the_job(monkeypatch) -> None:
    monkeypatch.setitem(engines._ENGINES, "refusing", engines._Entry("test_engines:Refusing", 20))
    assert resolve_engine("auto", job()).name == "hf"  # the better-ranked one refuses: the reference runs
    monkeypatch.setitem(engines._ENGINES, "accepting", engines._Entry("test_engines:Accepting", 10))
    assert resolve_engine("auto", job()).name == "accepting"


def test_an_engine_that_cannot_run_the_job_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setitem(engines._ENGINES, "refusing", engines._Entry("test_engines:Refusing", 0))
    with pytest.raises(PeftlabError, match=r"^train\.engine: refusing cannot run this causal_lm job: needs a CUDA GPU; fix: "):
        resolve_engine("refusing", job())
    monkeypatch.setitem(engines._ENGINES, "broken", engines._Entry("peftlab.no_such_module:Engine", 0))
    with pytest.raises(PeftlabError, match="broken cannot run .*it does not import here"):
        resolve_engine("broken", job())


def test_an_unregistered_engine_is_refused_before_a_run_folder_exists(monkeypatch, runs_dir, cli) -> None:
    monkeypatch.delitem(engines._ENGINES, "fast", raising=False)
    code, lines = cli("train", "tiny-gemma2-dolly", "--set", "train.engine=fast", "--runs-dir", str(runs_dir))
    assert code == 2
    assert lines == ["error: train.engine: 'fast' is not registered in this install (registered: hf); "
                     "fix: --set train.engine=auto"]
    assert not runs_dir.exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"train.memory_limit_gib": 0}, "train.memory_limit_gib: Input should be greater than 0"),
    ({"train.engine": "fastest"}, "train.engine: Input should be 'auto', 'hf' or 'fast'"),
])
def test_engine_settings_are_validated(changes, message) -> None:
    with pytest.raises(PeftlabError, match=message):
        with_overrides(load_recipe("tiny-gemma2-dolly"), changes)


class Pruner:
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def train_begun(self) -> None:
        pass

    def evaluated(self, step: int, metrics: dict) -> bool:
        self.seen.append((step, metrics["eval_loss"]))
        return metrics["eval_loss"] > 1.0

    def train_ended(self) -> None:
        pass


class Recorder:
    """A tracker stand-in: what the hooks hand to tracking."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)


def test_a_loop_of_its_own_gets_records_guard_tracking_and_stop_from_the_hooks(runs_dir) -> None:
    """What a new engine's loop does: count micro-batches, log steps and evaluations, honour should_stop."""
    run = RunDir.create(runs_dir, "hooked", load_recipe("tiny-gemma2-dolly"))
    context = RunContext("gemma2", "fp32", "eager", 1e-3, "lora")
    tracker, pruner = Recorder(), Pruner()
    hooks = TrainingHooks(run, BatchCounter(), HealthGuard(context), Progress("train", False), tracker, [pruner])
    hooks.train_begin(max_steps=4)
    batch = {"input_ids": _ids([[1, 2, 3, 0]]), "attention_mask": _ids([[1, 1, 1, 0]]), "labels": _ids([[-100, 2, 3, -100]])}
    for step in (1, 2):
        hooks.micro_batch(batch)
        hooks.step_end(step)
    record = hooks.log_train(2, 0.5, 2.5, 1.0, 1e-3)
    assert (record["tokens"], record["padded_tokens"], record["samples"]) == (6, 8, 2) and record["tokens_per_s"] > 0
    hooks.log_eval(2, 0.5, {"eval_loss": 0.9})
    assert not hooks.should_stop()
    hooks.log_eval(3, 0.75, {"eval_loss": 1.5})
    assert hooks.should_stop() and pruner.seen == [(2, 0.9), (3, 1.5)]
    with pytest.raises(GuardFailure, match="step 4: loss is nan"):
        hooks.log_train(4, 1.0, math.nan, 1.0, 1e-3)
    hooks.train_end()
    assert [r["kind"] for r in run.metrics()] == ["train", "eval", "eval", "train"]
    assert [r["kind"] for r in tracker.records] == ["train", "eval", "eval", "train"]
    assert run.summary()["max_steps"] == 4
    assert hooks.carry()["counter"]["trained_tokens"] == 4  # what a checkpoint carries to a resumed run


def test_a_resumed_session_goes_on_with_the_open_logging_window_and_the_guard_history(runs_dir) -> None:
    """What `carry()` puts in a checkpoint makes the resumed session's guard decide as the uninterrupted run's:
    the label tokens trained since the last record (so a 0.0 there is convergence) and the divergence rule's losses."""
    run = RunDir.create(runs_dir, "carried", load_recipe("tiny-gemma2-dolly"))
    context, rule = RunContext("gemma2", "fp32", "eager", 1e-3, "lora"), Divergence(10.0, 2)
    batch = {"input_ids": _ids([[1, 2, 3, 0]]), "attention_mask": _ids([[1, 1, 1, 0]]), "labels": _ids([[-100, 2, 3, -100]])}
    first = TrainingHooks(run, BatchCounter(), HealthGuard(context, divergence=rule), Progress("train", False), Recorder())
    first.train_begin(max_steps=5)
    for step in (1, 2):
        first.micro_batch(batch)
        first.log_train(step, 0.1 * step, 1.0, 1.0, 1e-3)
    first.micro_batch(batch)  # step 3 trained, the checkpoint taken before its record
    carried = first.carry()
    assert carried["logged"]["step"] == 2 and carried["guard"]["losses"] == [1.0, 1.0]
    second = TrainingHooks(run, BatchCounter(**carried["counter"]), HealthGuard(context, divergence=rule),
                           Progress("train", False), Recorder(), carried=carried)
    second.train_begin(max_steps=5, step=3)
    second.log_train(3, 0.3, 0.0, 0.0, 1e-3)  # the window holds step 3's trained tokens: converged, runs on
    second.micro_batch(batch)
    second.log_train(4, 0.4, 50.0, 1.0, 1e-3)
    second.micro_batch(batch)
    with pytest.raises(GuardFailure, match="step 5: loss diverged"):  # against the first session's losses
        second.log_train(5, 0.5, 50.0, 1.0, 1e-3)


def test_tracking_off_tracks_nothing(runs_dir) -> None:
    run = RunDir.create(runs_dir, "untracked", load_recipe("tiny-gemma2-dolly"))
    tracker = start_trackers(TrackingConfig(), run, {})
    tracker.log({"kind": "train", "step": 1, "loss": 1.0})
    tracker.finish()
    assert not (run.path / "wandb").exists()


def _ids(rows: list[list[int]]):
    import torch

    return torch.tensor(rows)
