"""What the tasks share: the adapter folder, the run context the guard and loaders need, the announcement
every task prints before training, and the doctor's checkup list."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftlab.config import Recipe
from peftlab.runs import RunDir, atomic_dir, atomic_write_json
from peftlab.watch.console import say
from peftlab.watch.guard import RunContext


def save_adapter(run: RunDir, model: Any, tokenizer: Any, extra_json: dict[str, Any] | None = None) -> None:
    """adapter/ (LoRA weights as safetensors, tokenizer, any extra JSON files), swapped in whole; by rank 0 only.
    Every rank calls it: under FSDP/ZeRO-3 the adapter is first gathered from the ranks' shards."""
    from peftlab.distributed import full_trainable_state_dict

    state = full_trainable_state_dict(model)
    if not run.writer:
        return
    with atomic_dir(run.adapter_path) as folder:
        model.save_pretrained(folder, state_dict=state)
        tokenizer.save_pretrained(folder)
        for name, data in (extra_json or {}).items():
            atomic_write_json(folder / name, data)


def run_context(recipe: Recipe) -> RunContext:
    """Model family, precision and attention this recipe runs with (what the guard and the loaders need)."""
    from peftlab.models import loader
    from peftlab.models.precision import resolve_precision

    model_type = loader.load_model_config(recipe.model).model_type
    precision = resolve_precision(recipe.train.precision, model_type)
    attn = loader.attention_implementation(recipe.model.attn_implementation, model_type)
    return RunContext(model_type, precision, attn, recipe.train.lr, recipe.method.name, recipe.method.quant.compute_dtype)


def announce(recipe: Recipe, context: Any, params: Any, notes: list[str]) -> None:
    """The lines every task prints before training: model, method, precision, parameter counts, notes."""
    from peftlab.models import loader

    say(f"model {loader.describe_source(recipe.model)} | {recipe.method.name} | {context.precision} | "
        f"attention {context.attn_implementation}")
    say(str(params))
    for note in notes:
        say(f"note: {note}")


@dataclass
class Checkup:
    """`peftlab doctor`'s list: each check prints ok/FAIL, the failures are its problems."""

    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, good: str, bad: str) -> None:
        say(("ok    " if ok else "FAIL  ") + (good if ok else bad))
        if not ok:
            self.problems.append(bad)
