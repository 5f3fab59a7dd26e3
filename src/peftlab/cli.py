"""The `peftlab` command: thin verbs over the library. Every user-fixable problem is one line, exit 2."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from peftlab.errors import PeftlabError, did_you_mean
from peftlab.watch.console import harden_stdio, print_table, say, say_error

if TYPE_CHECKING:
    from peftlab.distributed import Nodes
    from peftlab.runs import Placement

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA / QLoRA fine-tuning experiments: recipes, run folders, a health guard, comparisons.")

RecipeArg = Annotated[str, typer.Argument(help="built-in recipe name (see `peftlab recipes`) or a YAML path")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe field, e.g. --set train.lr=1e-4")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="where run folders go")]
# Verbs that train: not given = the recipe's output_dir, else DEFAULT_RUNS (runs.place); given, it wins.
RunsRootOpt = Annotated[Path | None, typer.Option(
    "--runs-dir", help="where run folders go [default: the recipe's output_dir, else $PEFTLAB_RUNS or runs]")]
DEFAULT_RUNS = Path(os.environ.get("PEFTLAB_RUNS", "runs"))
USAGE_EXIT = 2


def show_version(value: bool) -> None:
    if value:
        from peftlab import __version__

        say(f"peftlab {__version__}")
        raise typer.Exit(0)


@app.callback()
def options(version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                   help="print the version and exit")] = False) -> None:
    """LoRA / QLoRA fine-tuning experiments: recipes, run folders, a health guard, comparisons."""


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, deprecation notes) out of the run's console log."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read on diffusers' first import (seconds: not done here)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft|trl|diffusers|huggingface_hub)\b.*")


recipes_app = typer.Typer(help="The built-in recipes: list them, show one with its comments, copy one to edit.")
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context) -> None:
    """List the built-in recipes (`recipes show NAME`, `recipes copy NAME PATH` for one of them)."""
    if ctx.invoked_subcommand is None:
        list_recipes()


@recipes_app.command("list")
def list_recipes() -> None:
    """List the built-in recipes."""
    from peftlab.config import builtin_recipes, load_recipe

    rows = []
    for name, path in sorted(builtin_recipes().items()):
        r = load_recipe(str(path))
        rows.append([name, r.task, r.model.source, r.data.source, r.method.name])
    print_table(["recipe", "task", "model", "data", "method"], rows)


@recipes_app.command("show")
def show_recipe(name: Annotated[str, typer.Argument(help="built-in recipe name")]) -> None:
    """Print a built-in recipe as written, comments included."""
    from peftlab.config import builtin_recipe_text

    sys.stdout.write(builtin_recipe_text(name))


@recipes_app.command("copy")
def copy_recipe(name: Annotated[str, typer.Argument(help="built-in recipe name")],
                path: Annotated[Path, typer.Argument(help="the new YAML file, e.g. my-recipe.yaml")],
                force: Annotated[bool, typer.Option(help="replace the file if it exists")] = False) -> None:
    """Copy a built-in recipe to PATH, to start a recipe of your own (`peftlab train PATH`)."""
    from peftlab.config import builtin_recipe_text
    from peftlab.runs import atomic_write_text, writing_output

    if path.exists() and not force:
        raise PeftlabError(f"{path}: already exists; fix: choose another path, or --force to replace it")
    text = builtin_recipe_text(name)
    with writing_output(path, ""):
        atomic_write_text(path, text)
    say(f"wrote {path}; edit it, then: peftlab train {path}")


@app.command()
def train(recipe: Annotated[str | None, typer.Argument(help="built-in recipe name or YAML path (optional with --resume)")] = None,
          set_: SetOpt = None,
          name: Annotated[str | None, typer.Option(help="run folder name [default: the recipe's output_dir's, else "
                                                        "RECIPE-METHOD-TIME]")] = None,
          runs_dir: RunsRootOpt = None,
          overwrite: Annotated[bool, typer.Option(help="replace an existing run folder of that name")] = False,
          resume: Annotated[str | None, typer.Option(help="continue this run (folder or name) from its last checkpoint")] = None,
          baseline: Annotated[str | None, typer.Option(
              help="then compare with this run, JSON file of metrics, or shipped reference (dialogpt-banking77-original)")] = None,
          gpus: Annotated[int, typer.Option(min=1, help="data-parallel processes (per machine), one per GPU (CPU-only: gloo processes)")] = 1,
          strategy: Annotated[str, typer.Option(help="with --gpus > 1: ddp | fsdp | zero2 | zero3")] = "ddp",
          nnodes: Annotated[int, typer.Option(help="machines in the run (torchrun --nnodes); run the same command on each")] = 1,
          node_rank: Annotated[int | None, typer.Option(help="this machine's rank, 0..nnodes-1 (default: assigned at rendezvous)")] = None,
          rdzv_endpoint: Annotated[str | None, typer.Option(help="with --nnodes > 1: HOST:PORT every machine reaches")] = None,
          rdzv_id: Annotated[str | None, typer.Option(help="with --nnodes > 1: a job id, the same on every machine")] = None) -> None:
    """Train a recipe into a run folder, or --resume a stopped one. Ctrl-C / SIGTERM save a checkpoint (exit 130)."""
    from peftlab.config import load_recipe
    from peftlab.distributed import Nodes, checked_strategy, ranks
    from peftlab.runner import default_run_name, resume_run, run_recipe
    from peftlab.runs import check_name

    check_name(name, "--name")
    quiet_libraries()
    checked_strategy(strategy, "--strategy")  # a typo is refused even where it would not be used (one process)
    nodes = Nodes(nnodes, node_rank, rdzv_endpoint, rdzv_id)
    nodes.check()
    loaded = load_recipe(recipe, set_) if recipe else None
    if (gpus > 1 or nnodes > 1) and not ranks().distributed:
        # The ranks must agree on one folder: name it here, once (across machines, rank 0's name wins); an
        # output_dir names it already, the same in every rank.
        named = resume or name or loaded is None or (loaded.output_dir and runs_dir is None)
        raise typer.Exit(launch(gpus, strategy, None if named else default_run_name(loaded), nodes))
    if resume:
        if name or overwrite:
            raise PeftlabError("--resume continues an existing run folder; fix: drop --name/--overwrite")
        if loaded is None and set_:
            raise PeftlabError("--set with --resume: a resumed run keeps its recipe; fix: drop --set, or start a new run")
        runs_dir = runs_dir or DEFAULT_RUNS
        run = resume_run(resume, runs_dir, loaded)
    elif loaded is None:
        raise PeftlabError("train: missing RECIPE; fix: `peftlab train tiny-gemma2-dolly` (see `peftlab recipes`) or --resume RUN")
    else:
        where = placed(loaded.output_dir, runs_dir, name, one_run=True)
        runs_dir = where.runs_dir
        run = run_recipe(loaded, runs_dir, where.name, overwrite=overwrite)
    if baseline:
        show_comparison([run], baseline_source(baseline, runs_dir))


def placed(output_dir: str | None, runs_dir: Path | None, name: str | None, one_run: bool) -> Placement:
    """runs.place for a verb's flags; the note that they beat the recipe's output_dir goes to stderr."""
    from peftlab.runs import place
    from peftlab.watch.progress import status

    where = place(output_dir, runs_dir, name, DEFAULT_RUNS, one_run)
    if where.note:
        status(where.note)
    return where


def launch(processes: int, strategy: str, run_name: str | None, nodes: Nodes) -> int:
    """Re-run this command line as `processes` ranks (per machine) under torchrun; returns its exit code."""
    import subprocess

    import torch

    from peftlab.distributed import STRATEGY_ENV, checked_strategy, launch_command

    env = {**os.environ, STRATEGY_ENV: checked_strategy(strategy, "--strategy")}
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise PeftlabError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} GPU(s); fix: --gpus <= that")
    if not torch.cuda.is_available():
        if strategy != "ddp":  # accelerate applies FSDP/DeepSpeed only on accelerators: it would silently be DDP
            raise PeftlabError(f"--strategy {strategy}: needs CUDA GPUs (on CPU processes accelerate would run DDP "
                               "instead); fix: --strategy ddp")
        say(f"note: no CUDA GPU: {processes * nodes.nnodes} CPU processes (gloo) instead")
    argv = without_options(sys.argv[1:], LAUNCH_OPTIONS) + (["--name", run_name] if run_name else [])
    return subprocess.run(launch_command(argv, processes, nodes), env=env).returncode


LAUNCH_OPTIONS = ("--gpus", "--strategy", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


def without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without `options` (each with its value, as `--opt V` or `--opt=V`): what the parent consumed."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out


@app.command()
def sweep(recipe: RecipeArg,
          trials: Annotated[int | None, typer.Option(min=0, help="trials to run now (default: the recipe's sweep.trials)")] = None,
          final: Annotated[bool, typer.Option(help="then retrain the best parameters and evaluate on test")] = False,
          study: Annotated[str | None, typer.Option(help="study name and folder under --runs-dir (default: the recipe name)")] = None,
          storage: Annotated[str | None, typer.Option(
              help="SQLAlchemy URL shared by several machines (default: sqlite in the study folder)")] = None,
          resume: Annotated[bool, typer.Option(help="extend an existing study with more trials")] = False,
          set_: SetOpt = None, runs_dir: RunsRootOpt = None,
          baseline: Annotated[str | None, typer.Option(
              help="with --final: compare with this run, JSON file of metrics, or shipped reference")] = None,
          gpus: Annotated[int, typer.Option(min=1, help="workers on one study, one per GPU (CPU-only: processes)")] = 1) -> None:
    """Optuna search over the recipe's sweep.space: one run folder per trial, pruning, plots, --final on test."""
    from peftlab.config import load_recipe
    from peftlab.runs import check_name
    from peftlab.sweep import run_sweep, run_workers

    check_name(study, "--study")
    quiet_libraries()
    if baseline and not final:
        raise PeftlabError("--baseline compares the final run; fix: add --final")
    if trials == 0 and not resume:  # 0 is for an existing study: its results and --final without new trials
        raise PeftlabError("--trials 0: a new study with no trial has nothing to report; fix: --trials N (N >= 1), "
                           "or --resume to write an existing study's results (and --final) without new trials")
    loaded = load_recipe(recipe, set_)
    runs_dir = placed(loaded.output_dir, runs_dir, None, one_run=False).runs_dir
    if gpus > 1:  # the workers run the trials; then this process writes the results and runs --final once
        argv = without_options(sys.argv[1:], ("--gpus", "--trials", "--study", "--storage", "--baseline"))
        flags = ("--final", "--no-final", "--resume", "--no-resume")
        storage = run_workers(loaded, [a for a in argv if a not in flags], gpus, runs_dir, trials, study, storage, resume)
        trials, resume = 0, True
    result = run_sweep(loaded, runs_dir, trials, study, storage, resume, final)
    if result.best_run is not None:
        say(f"best trial: {result.best_run.path}")
    if result.final_run is not None:
        say(f"final run: {result.final_run.path}")
        if baseline:
            show_comparison([result.final_run], baseline_source(baseline, runs_dir))
    say(f"study folder: {result.folder} (sweep.json, optimization_history.png, param_importances.png)")


@app.command()
def matrix(recipe: RecipeArg, methods: Annotated[str, typer.Option(help="comma-separated: lora,qlora")] = "lora,qlora",
           set_: SetOpt = None, name: Annotated[str | None, typer.Option(help="run name prefix")] = None,
           runs_dir: RunsRootOpt = None, overwrite: bool = False) -> None:
    """Run one recipe under several methods with identical settings, then compare them."""
    from peftlab.config import load_recipe
    from peftlab.matrix import parse_methods, run_matrix
    from peftlab.report.html import show_report
    from peftlab.runs import check_name, sanitize_name

    check_name(name, "--name")
    quiet_libraries()
    loaded = load_recipe(recipe, set_)
    runs_dir = placed(loaded.output_dir, runs_dir, None, one_run=False).runs_dir
    prefix = name or loaded.name
    runs = run_matrix(loaded, parse_methods(methods), runs_dir, prefix, overwrite=overwrite)
    show_comparison(runs)
    show_report(runs, runs_dir / f"{sanitize_name(prefix)}-report.html")
    show_grid(runs, runs_dir / f"{sanitize_name(prefix)}-grid.png")


def show_grid(runs, path: Path) -> None:
    """Diffusion runs: their sample grids side by side in one PNG (base | lora | qlora ...)."""
    from peftlab.report.grids import combine_run_grids

    if combine_run_grids(runs, path):
        say(f"image grid: {path}")


RunsArg = Annotated[list[str], typer.Argument(help="run names (see `peftlab runs`) or folders")]
BaselineOpt = Annotated[str | None, typer.Option(
    help="run (or JSON file of reference metrics) to compare against; default: the first run")]


@app.command()
def compare(runs: RunsArg, baseline: BaselineOpt = None,
            format_: Annotated[str, typer.Option("--format", help="table | markdown | csv | json")] = "table",
            runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """Compare runs side by side: speedup, memory change %, metric deltas against a baseline."""
    from peftlab.report.compare import FORMATS, open_source

    if format_ not in FORMATS:
        raise PeftlabError(f"--format '{format_}': unknown; {did_you_mean(format_, FORMATS)}")
    show_comparison([open_source(r, runs_dir) for r in runs], baseline_source(baseline, runs_dir) if baseline else None,
                    format_)


def baseline_source(ref: str, runs_dir: Path):
    """A run, a JSON file of reference metrics, or a reference shipped beside the built-in recipes."""
    from importlib import resources

    from peftlab.report.compare import ReferenceFile, open_source

    shipped = Path(str(resources.files("peftlab") / "recipes" / f"{ref}.json"))
    if not Path(ref).exists() and shipped.is_file():
        return ReferenceFile(shipped)
    return open_source(ref, runs_dir)


def show_comparison(runs, baseline=None, fmt: str = "table") -> None:
    from peftlab.report.compare import compare as compare_runs
    from peftlab.report.compare import print_comparison

    print_comparison(compare_runs(runs, baseline), fmt)


@app.command()
def report(runs: RunsArg, baseline: BaselineOpt = None,
           output: Annotated[Path, typer.Option("--output", "-o", help="the HTML file to write")] = Path("report.html"),
           runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """One self-contained HTML page: comparison, training curves, samples, recipes, environments."""
    from peftlab.report.compare import open_source
    from peftlab.report.html import show_report

    show_report([open_source(r, runs_dir) for r in runs], output, baseline_source(baseline, runs_dir) if baseline else None,
                option="-o")


@app.command("runs")
def list_runs(task: Annotated[str | None, typer.Option(help="only this task, e.g. sft")] = None,
              recipe: Annotated[str | None, typer.Option(help="only this recipe name")] = None,
              method: Annotated[str | None, typer.Option(help="only this method, e.g. qlora")] = None,
              status: Annotated[str | None, typer.Option(help="running | dead | completed | failed | interrupted | pruned")] = None,
              json_: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
              runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """List the runs under the runs folder (an SQLite index, rebuilt from the folders when needed)."""
    import json

    from peftlab.registry import HEADERS, Registry

    if not runs_dir.is_dir():
        raise PeftlabError(f"--runs-dir '{runs_dir}' does not exist; fix: point it at your runs folder, or train first")
    registry = Registry(runs_dir)
    registry.sync()
    entries = registry.query(task=task, recipe=recipe, method=method, status=status)
    if json_:
        typer.echo(json.dumps([e.as_dict() for e in entries], indent=2))
    elif entries:
        print_table(HEADERS, [e.cells() for e in entries], title=f"runs in {runs_dir}")
    else:
        say(f"no runs in {runs_dir} match" + ("" if not (task or recipe or method or status) else " these filters"))


@app.command()
def watch(run: Annotated[str, typer.Argument(help="run name or folder")],
          interval: Annotated[float, typer.Option(min=0.1, help="seconds between polls")] = 2.0,
          timeout: Annotated[float, typer.Option(min=0, help="seconds to wait for the run folder to appear")] = 60.0,
          runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """Follow a run live: metrics as they are logged, loss sparkline, ETA; ends when the run ends (or dies)."""
    from peftlab.watch.live import follow, wait_for_run

    if follow(wait_for_run(run, runs_dir, timeout), interval) != "completed":
        raise typer.Exit(1)


@app.command()
def doctor(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe before training: masking, lengths, one forward+backward, params, memory estimate."""
    from peftlab.config import load_recipe
    from peftlab.doctor import run_doctor

    quiet_libraries()
    problems = run_doctor(load_recipe(recipe, set_))
    if problems:
        say(f"doctor found {len(problems)} problem(s)")
        raise typer.Exit(1)
    say("doctor: healthy")


@app.command()
def generate(run: Annotated[str, typer.Argument(help="run folder or name")],
             prompt: Annotated[list[str], typer.Option(help="instruction to answer, text to classify, or image prompt (repeatable)")],
             max_new_tokens: Annotated[int | None, typer.Option(help="default: the recipe's eval.max_new_tokens")] = None,
             seed: Annotated[list[int] | None, typer.Option(help="diffusion: one image per seed (repeatable)")] = None,
             steps: Annotated[int | None, typer.Option(help="diffusion: denoising steps (default: the recipe's)")] = None,
             runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """Use a run's saved adapter: SFT answers, classify labels, diffusion PNG files (their paths are printed)."""
    quiet_libraries()  # before the imports below: trl imports bitsandbytes, which logs at import
    from peftlab.config import load_recipe
    from peftlab.runs import open_run
    from peftlab.tasks import get_task

    folder = open_run(run, runs_dir)
    recipe = load_recipe(str(folder.config_path))
    if not folder.adapter_path.exists():
        raise PeftlabError(f"run '{folder.path}' has no adapter/ (status {folder.shown_status()}); fix: pick a completed run")
    for line in get_task(recipe.task).generate(folder, recipe, prompt, max_new_tokens, seed, steps):
        say(line)


@app.command()
def export(run: Annotated[str, typer.Argument(help="run folder or name")],
           out: Annotated[Path | None, typer.Option("--out", "-o", help="the model folder (default: <run>-merged beside the run)")] = None,
           push: Annotated[str | None, typer.Option(help="then upload to this hub repo (user/name), created private")] = None,
           runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """Merge a run's adapter into its base (QLoRA: into the dequantised base) and write a safetensors model that
    transformers (diffusers, for SD) loads, with a model card from the run's summary."""
    quiet_libraries()
    from peftlab.config import load_recipe
    from peftlab.export import describe, export_run
    from peftlab.export import push as push_folder
    from peftlab.runs import open_run, writing_output

    folder = open_run(run, runs_dir)
    out = out or folder.path.parent / f"{folder.name}-merged"
    with writing_output(out, "-o"):
        exported = export_run(folder, load_recipe(str(folder.config_path)), out)
    for line in describe(folder, out, exported):
        say(line)
    if push:
        say(f"pushed: {push_folder(out, push)}")


@app.command()
def demo(runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """No arguments, no GPU, no hub: the real Gemma 3 270M (PyPI's GGUF) learning 4 Banking77 intents with LoRA and
    QLoRA (accuracy before and after, the comparison), the loss-0.0 failure stopped by the guard, and the timing."""
    from peftlab.demo import run_demo

    quiet_libraries()
    runs = run_demo(runs_dir)
    say(f"run folders: {', '.join(str(r.path) for r in runs)}, {runs_dir / 'demo-loss0'}")
    say("note: on a CPU, memory is the process's resident set and bitsandbytes runs 4-bit through a dequantizing "
        "fallback, so these speed and memory ratios are not GPU figures (see bench/README.md for H100 and H200 numbers)")


def usage_error(exc: typer.TyperException) -> int:
    """click's usage errors (unknown flag or command, missing argument, flag without value) as one `error:`
    line on stderr. typer vendors click and exports no UsageError: the exception carries its message and code."""
    message = exc.format_message().strip().rstrip(".").replace("\n", " ")
    if not message:  # bare `peftlab`: the help was already printed
        return USAGE_EXIT
    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    where = " ".join(["peftlab", *[arg for arg in sys.argv[1:] if arg in names][:1]])
    say_error(f"error: {where}: {message}; fix: see `{where} --help`")
    return getattr(exc, "exit_code", USAGE_EXIT) or USAGE_EXIT


def main() -> None:
    harden_stdio()
    try:
        code = app(standalone_mode=False)
    except PeftlabError as exc:
        say_error(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        from peftlab.runner import INTERRUPTED_EXIT

        say(f"interrupted: {exc}" if str(exc) else "interrupted")
        sys.exit(INTERRUPTED_EXIT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors
        sys.exit(usage_error(exc))
    # typer turns Ctrl-C (and our TrainingInterrupted) into `return 130` when not standalone.
    if isinstance(code, int) and code:
        sys.exit(code)
