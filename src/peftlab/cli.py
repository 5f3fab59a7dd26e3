"""The `peftlab` command: thin verbs over the library. Every user-fixable problem is one line, exit 2."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from peftlab.errors import PeftlabError
from peftlab.watch.console import harden_stdio, print_table, say

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA / QLoRA fine-tuning experiments: recipes, run folders, a health guard, comparisons.")

RecipeArg = Annotated[str, typer.Argument(help="built-in recipe name (see `peftlab recipes`) or a YAML path")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe field, e.g. --set train.lr=1e-4")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="where run folders go")]
DEFAULT_RUNS = Path(os.environ.get("PEFTLAB_RUNS", "runs"))


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, deprecation notes) out of the run's console log."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft|trl)\b.*")


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    from peftlab.config import builtin_recipes, load_recipe

    rows = []
    for name, path in sorted(builtin_recipes().items()):
        r = load_recipe(str(path))
        rows.append([name, r.task, r.model.source, r.data.source, r.method.name])
    print_table(["recipe", "task", "model", "data", "method"], rows)


@app.command()
def train(recipe: RecipeArg, set_: SetOpt = None, name: Annotated[str | None, typer.Option(help="run folder name")] = None,
          runs_dir: RunsDirOpt = DEFAULT_RUNS,
          overwrite: Annotated[bool, typer.Option(help="replace an existing run folder of that name")] = False) -> None:
    """Train a recipe into a run folder."""
    from peftlab.config import load_recipe
    from peftlab.runner import run_recipe

    quiet_libraries()
    run_recipe(load_recipe(recipe, set_), runs_dir, name, overwrite=overwrite)


@app.command()
def matrix(recipe: RecipeArg, methods: Annotated[str, typer.Option(help="comma-separated: lora,qlora")] = "lora,qlora",
           set_: SetOpt = None, name: Annotated[str | None, typer.Option(help="run name prefix")] = None,
           runs_dir: RunsDirOpt = DEFAULT_RUNS, overwrite: bool = False) -> None:
    """Run one recipe under several methods with identical settings, then compare them."""
    from peftlab.config import load_recipe
    from peftlab.matrix import parse_methods, run_matrix

    quiet_libraries()
    loaded = load_recipe(recipe, set_)
    runs = run_matrix(loaded, parse_methods(methods), runs_dir, name or loaded.name, overwrite=overwrite)
    show_comparison(runs)


@app.command()
def compare(runs: Annotated[list[str], typer.Argument(help="run folders or names")],
            baseline: Annotated[str | None, typer.Option(help="run to compare against (default: the first)")] = None,
            runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """Compare finished runs side by side, with ratios against a baseline."""
    from peftlab.runs import open_run

    show_comparison([open_run(r, runs_dir) for r in runs], open_run(baseline, runs_dir) if baseline else None)


def show_comparison(runs, baseline=None) -> None:
    from peftlab.report.compare import comparison_rows, ratio_sentences, table_lines

    rows, base = comparison_rows(runs, baseline)
    headers, body = table_lines(rows, base)
    print_table(headers, body, title="comparison")
    for line in ratio_sentences(rows, base):
        say(line)


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
             prompt: Annotated[list[str], typer.Option(help="instruction to answer (repeatable)")],
             max_new_tokens: Annotated[int | None, typer.Option(help="default: the recipe's eval.max_new_tokens")] = None,
             runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """Generate with a run's saved adapter."""
    from peftlab.config import load_recipe
    from peftlab.runs import open_run
    from peftlab.tasks.sft import generate as generate_text
    from peftlab.tasks.sft import load_for_inference

    quiet_libraries()
    folder = open_run(run, runs_dir)
    recipe = load_recipe(str(folder.config_path))
    if not folder.adapter_path.exists():
        raise PeftlabError(f"run '{folder.path}' has no adapter/ (status {folder.summary().get('status')}); fix: pick a completed run")
    model, tokenizer = load_for_inference(folder, recipe)
    for text in prompt:
        say(f"> {text}")
        say(generate_text(model, tokenizer, text, recipe, max_new_tokens))


@app.command()
def demo(runs_dir: RunsDirOpt = DEFAULT_RUNS) -> None:
    """No arguments, no GPU, no network: tiny-gemma2-dolly with LoRA and QLoRA on the bundled Dolly data."""
    from peftlab.config import load_recipe
    from peftlab.matrix import run_matrix

    quiet_libraries()
    runs = run_matrix(load_recipe("tiny-gemma2-dolly"), ["lora", "qlora"], runs_dir, "demo", overwrite=True)
    show_comparison(runs)
    say(f"run folders: {', '.join(str(r.path) for r in runs)}")


def main() -> None:
    harden_stdio()
    try:
        app(standalone_mode=False)
    except PeftlabError as exc:
        say(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        from peftlab.runner import INTERRUPTED_EXIT

        say("interrupted")
        sys.exit(INTERRUPTED_EXIT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise
