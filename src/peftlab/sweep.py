"""`peftlab sweep`: an Optuna study over the search space a recipe declares (`sweep.space`).

Every trial is an ordinary run folder (runs/<study>/trial-NNN) trained by the ordinary runner with
the sampled values applied as recipe overrides, so a trial can be inspected, compared and resumed
like any run. A TrainerCallback reports each validation metric to Optuna; the median pruner stops
trials that fall behind (their run folder says `pruned`). The study lives in SQLite inside the study
folder by default, so a sweep can be resumed and extended, or in any SQLAlchemy URL that several
machines share (Optuna's heartbeat retries a trial whose machine died). `--final` retrains with the
best parameters and evaluates on the test set. `--gpus N` starts N workers on one study, one per GPU
(`run_workers`), then runs `--final` once itself.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.columns import number
from peftlab.config import Recipe, SearchParam, with_overrides
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.metrics import lower_is_better
from peftlab.registry import index_run
from peftlab.runlock import exclusive
from peftlab.runner import run_recipe
from peftlab.runs import RunDir, atomic_write_json, sanitize_name
from peftlab.tasks import get_task
from peftlab.watch.console import print_table, say
from peftlab.watch.progress import Countdown

STUDY_DB = "study.db"
RESULTS_FILE = "sweep.json"
HEARTBEAT_S = 60  # a RUNNING trial without a heartbeat for GRACE_S is failed and retried once
STORAGE_ATTEMPTS = 4
SCHEMA_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "database is locked")
GRACE_S = 300


@dataclass
class SweepResult:
    study: Any  # optuna.Study
    folder: Path
    best_run: RunDir | None
    final_run: RunDir | None


def objective_metric(recipe: Recipe) -> str:
    """sweep.metric, or the task's key objective (the first it declares) when the recipe names none."""
    return recipe.sweep.metric or get_task(recipe.task).objectives[0]


def direction(recipe: Recipe) -> str:
    if recipe.sweep.direction != "auto":
        return recipe.sweep.direction
    return "minimize" if lower_is_better(objective_metric(recipe)) else "maximize"


def check_sweepable(recipe: Recipe) -> list[str]:
    """One-line errors for a sweep that cannot work; notes for one that works less well."""
    s, metric = recipe.sweep, objective_metric(recipe)
    valid = get_task(recipe.task).objectives
    if metric not in valid:
        raise PeftlabError(f"sweep.metric '{metric}' is not a validation metric of task {recipe.task}; valid: {', '.join(valid)}")
    if not s.space:
        raise PeftlabError(
            "sweep.space is empty; fix: declare the fields to search in the recipe, e.g. "
            "sweep.space: {train.lr: {type: float, low: 1.0e-5, high: 5.0e-4, log: true}}"
        )
    validated = metric.startswith("eval_")  # eval_* metrics come from the validation set, the others from training
    if validated and recipe.data.eval_fraction == 0:
        raise PeftlabError(f"sweep.metric {metric} needs a validation set; fix: set data.eval_fraction > 0")
    if s.pruner != "none" and not validated:
        return [f"{metric} is known only at a trial's end, so no trial can be pruned"]
    if s.pruner != "none" and not recipe.train.eval_steps:
        return ["train.eval_steps is not set: trials are evaluated only at their end, so none can be pruned"]
    return []


def sample(trial: Any, space: dict[str, SearchParam]) -> dict[str, Any]:
    """Optuna suggestions for every dimension, keyed by the dotted recipe field they override."""
    params = {}
    for key, p in space.items():
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


class PruningCallback:
    """Reports each evaluation during training to the trial; stops training when the pruner says so.
    A listener of the training hooks (engines/hooks.py), so it prunes under every engine."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.training = False
        self.pruned: tuple[int, float] | None = None  # (step, value) where the pruner stopped the trial

    def job_ready(self, job: Any) -> None:
        pass

    def train_begun(self) -> None:
        self.training = True

    def train_ended(self) -> None:
        self.training = False  # evaluations after training (final metrics) are not intermediate values

    def evaluated(self, step: int, metrics: dict[str, Any]) -> bool:
        """Whether to stop training."""
        value = number(metrics.get(self.metric))
        if not self.training or value is None:
            return False
        self.trial.report(value, step=step)
        if self.trial.should_prune():
            self.pruned = (step, value)
            return True
        return False


def storage(url: str | None, folder: Path) -> Any:
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    url = with_driver(url) if url else default_storage(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                  failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
        except Exception as exc:  # sqlalchemy: bad URL, missing driver, unreachable server
            # Workers started together race to create the schema ("table studies already exists", a
            # duplicate alembic_version row, a locked SQLite file): the loser finds it complete a moment later.
            if any(sign in str(exc) for sign in SCHEMA_RACE) and attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(1.0 + attempt)
                continue
            raise PeftlabError(
                f"--storage: cannot open the study storage ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}); "
                "fix: pass an SQLAlchemy URL such as sqlite:///study.db or postgresql://user@host/db (with its driver installed)"
            ) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def default_storage(folder: Path) -> str:
    return f"sqlite:///{(folder / STUDY_DB).resolve()}"


POSTGRES_DRIVERS = (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg"))


def with_driver(url: str) -> str:
    """A `postgresql://` (or `postgres://`) URL with the installed driver named: SQLAlchemy would otherwise
    import psycopg2 and fail with a traceback when only psycopg 3 is installed (and it refuses `postgres://`)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    for module, dialect in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}{sep}{rest}"
    raise PeftlabError("--storage postgresql://...: no PostgreSQL driver is installed; fix: pip install psycopg2-binary "
                       "(or psycopg[binary])")


def open_study(recipe: Recipe, name: str, folder: Path, storage_url: str | None, resume: bool,
               pruner: Any = None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage(storage_url, folder)
    exists = name in optuna.get_all_study_names(store)
    # An explicit --storage is how several workers share one study: each joins it (the first creates it).
    join = resume or storage_url is not None
    if exists and not join:
        raise PeftlabError(f"study '{name}' already exists in its storage; fix: pass --resume to extend it, or --study NEW")
    if resume and not exists:
        raise PeftlabError(f"--resume: there is no study '{name}' in its storage yet; fix: drop --resume to start it")
    s = recipe.sweep
    if pruner is None:
        pruner = optuna.pruners.NopPruner() if s.pruner == "none" else optuna.pruners.MedianPruner(
            n_startup_trials=s.pruner_startup_trials, n_warmup_steps=s.pruner_warmup_steps)
    study = optuna.create_study(storage=store, study_name=name, direction=direction(recipe), pruner=pruner,
                                load_if_exists=join)
    if study.direction.name.lower() != direction(recipe):
        raise PeftlabError(
            f"study '{name}' was created to {study.direction.name.lower()}, the recipe now says {direction(recipe)} "
            f"{objective_metric(recipe)}; fix: use the same sweep.metric/direction, or --study NEW"
        )
    # Seeded, but differently per call: a resumed random sampler must not replay the first suggestions.
    # Workers joining at the same moment see the same trial count: the pid keeps their samplers apart.
    seed = recipe.seed + len(study.trials) + (os.getpid() if storage_url else 0)
    study.sampler = (optuna.samplers.RandomSampler(seed=seed) if s.sampler == "random"
                     else optuna.samplers.TPESampler(seed=seed))
    study.set_user_attr("recipe", recipe.name)
    study.set_user_attr("metric", objective_metric(recipe))
    return study


def trial_recipe(recipe: Recipe, params: dict[str, Any]) -> Recipe:
    """The recipe with a trial's values; trials never look at the test set (only --final does)."""
    return with_overrides(recipe, {**params, **get_task(recipe.task).trial_overrides(recipe)})


def objective(recipe: Recipe, folder: Path, show_progress: bool, countdown: Countdown) -> Any:
    """The Optuna objective: one trial = one run folder; `countdown` shows trial n/N of this call with the overall ETA."""
    import optuna

    metric = objective_metric(recipe)

    def run_trial(trial: Any) -> float:
        params = sample(trial, recipe.sweep.space)
        name = f"trial-{trial.number:03d}"
        trial.set_user_attr("run", name)
        countdown.next(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))
        pruning = PruningCallback(trial, metric)
        run = run_recipe(trial_recipe(recipe, params), folder, name, show_progress=show_progress, listeners=[pruning])
        sweep_info = {"study": folder.name, "trial": trial.number, "params": params, "objective": metric}
        if pruning.pruned is not None:
            step, value = pruning.pruned
            reason = f"pruned by the median rule at step {step} ({metric} {value:.4g})"
            run.update_summary(status="pruned", reason=reason, sweep=sweep_info)
            index_run(run)
            say(f"{name}: {reason}")
            raise optuna.TrialPruned(reason)
        value = number(run.summary().get(metric))
        run.update_summary(sweep=sweep_info)
        if value is None:
            raise GuardFailure(f"{name}: {metric} is {run.summary().get(metric)!r}, not a number; the trial counts as failed")
        return value

    return run_trial


def run_sweep(recipe: Recipe, runs_dir: Path, trials: int | None = None, study_name: str | None = None,
              storage_url: str | None = None, resume: bool = False, final: bool = False,
              show_progress: bool = True, pruner: Any = None) -> SweepResult:
    """Run `trials` more trials of the study, write its table and plots, then (with `final`) retrain
    the best parameters into a final run evaluated on test."""
    for note in check_sweepable(recipe):
        say(f"note: {note}")
    name = sanitize_name(study_name or recipe.name)
    folder = Path(runs_dir) / name
    study = open_study(recipe, name, folder, storage_url, resume, pruner)
    n = recipe.sweep.trials if trials is None else trials
    say(f"study '{name}': {n} trial(s), {direction(recipe)} {objective_metric(recipe)}; folder {folder}")
    # A trial stopped by the health guard (NaN loss at a high lr) is a failed trial, not a failed sweep.
    countdown = Countdown("trial", n)
    study.optimize(objective(recipe, folder, show_progress, countdown), n_trials=n, catch=(GuardFailure,))
    countdown.finish()
    best = best_trial(study)
    write_results(study, folder, recipe, storage_url)
    show_trials(study, recipe)
    best_run = RunDir(folder / best.user_attrs["run"]) if best is not None else None
    final_run = None
    if final:
        if best is None:
            raise PeftlabError(f"--final: study '{name}' has no completed trial yet; fix: run more trials first")
        with exclusive(folder / ".final.lock"):  # workers started with --final retrain once: the others reuse it
            final_run = run_final(recipe, best_trial(study), folder, show_progress)
    return SweepResult(study, folder, best_run, final_run)


def worker_commands(argv: list[str], workers: int, trials: int, url: str, study: str) -> list[list[str]]:
    """`peftlab sweep` command lines for `workers` processes sharing `trials` (the first ones take the remainder),
    joined to one study by its explicit storage URL. `argv` holds no option the parent consumed."""
    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    return [[sys.executable, "-m", "peftlab", *argv, "--trials", str(n), "--study", study, "--storage", url]
            for n in shares if n]


def run_workers(recipe: Recipe, argv: list[str], workers: int, runs_dir: Path, trials: int | None,
                study_name: str | None, storage_url: str | None, resume: bool) -> str:
    """Start one `peftlab sweep` worker per GPU (CUDA_VISIBLE_DEVICES = that GPU; on a CPU-only machine N
    processes) on one study, wait for all; returns the storage URL they shared. The study is opened here
    first, so a name clash is one error line before any worker starts. A worker that dies leaves a RUNNING
    trial whose heartbeat stops: another worker fails it after GRACE_S and RetryFailedTrialCallback queues
    it again."""
    import torch

    name = sanitize_name(study_name or recipe.name)
    folder = Path(runs_dir) / name
    gpus = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()] or \
        [str(i) for i in range(torch.cuda.device_count())]
    if torch.cuda.is_available() and workers > len(gpus):
        raise PeftlabError(f"--gpus {workers}: this machine has {len(gpus)} GPU(s); fix: --gpus <= that")
    url = with_driver(storage_url) if storage_url else default_storage(folder)
    open_study(recipe, name, folder, storage_url, resume)
    commands = worker_commands(argv, workers, recipe.sweep.trials if trials is None else trials, url, name)
    say(f"study '{name}': {len(commands)} worker(s)" + (f" on GPUs {', '.join(gpus[:len(commands)])}"
                                                       if torch.cuda.is_available() else " (CPU processes)"))
    procs = [subprocess.Popen(cmd, env={**os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[i]}
                                                         if torch.cuda.is_available() else {})})
             for i, cmd in enumerate(commands)]
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise PeftlabError(f"sweep worker(s) {', '.join(map(str, failed))} failed (see their output above); "
                           f"fix: the cause, then `peftlab sweep ... --resume --storage {url}`")
    return url


def best_trial(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial
        return None


def run_final(recipe: Recipe, best: Any, folder: Path, show_progress: bool) -> RunDir:
    """The best parameters, retrained and evaluated on test; reused when it already completed."""
    name = f"final-{best.user_attrs['run']}"
    existing = RunDir(folder / name)
    if existing.summary().get("status") == "completed":
        say(f"final run {existing.path} already completed with these parameters; reusing it")
        return existing
    say(f"--- final run with the best parameters (trial {best.number}): {best.params}")
    run = run_recipe(with_overrides(recipe, best.params), folder, name, overwrite=True, show_progress=show_progress)
    run.update_summary(sweep={"study": folder.name, "final_of_trial": best.number, "params": best.params})
    return run


def write_results(study: Any, folder: Path, recipe: Recipe, storage_url: str | None) -> None:
    """sweep.json (every trial: state, value, params, run folder, intermediate values) and the plots."""
    best = best_trial(study)
    atomic_write_json(folder / RESULTS_FILE, {
        "study": study.study_name,
        "storage": storage_url or STUDY_DB,  # a password in the URL is redacted on write
        "metric": objective_metric(recipe),
        "direction": direction(recipe),
        "space": {k: v.model_dump(exclude_none=True) for k, v in recipe.sweep.space.items()},
        "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params,
                                           "run": best.user_attrs.get("run")},
        "trials": [{"trial": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                    "run": t.user_attrs.get("run"), "intermediate": {str(k): v for k, v in t.intermediate_values.items()}}
                   for t in study.trials],
    })
    for note in write_plots(study, folder):
        say(f"note: {note}")


def write_plots(study: Any, folder: Path) -> list[str]:
    """optimization_history.png, intermediate_values.png, param_importances.png (Optuna's matplotlib plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as oplt

    notes = []
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {"optimization_history": oplt.plot_optimization_history, "intermediate_values": oplt.plot_intermediate_values}
    if len(completed) >= 2:
        plots["param_importances"] = oplt.plot_param_importances
    else:
        notes.append("param_importances.png needs at least 2 completed trials")
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. all trials agree on every parameter
                notes.append(f"{name}.png skipped ({exc})")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
    return notes


def show_trials(study: Any, recipe: Recipe) -> None:
    keys = list(recipe.sweep.space)
    best = best_trial(study)
    rows = []
    for t in study.trials:
        value = "n/a" if t.value is None or not math.isfinite(t.value) else f"{t.value:.4f}"
        params = [_fmt_param(t.params.get(k)) for k in keys]
        mark = " *" if best is not None and t.number == best.number else ""
        rows.append([f"{t.number}{mark}", t.state.name.lower(), value, *params, str(t.user_attrs.get("run", ""))])
    print_table(["trial", "state", objective_metric(recipe), *keys, "run"], rows, title=f"study {study.study_name} (* = best)")


def _fmt_param(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
