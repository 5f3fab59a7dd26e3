"""Task `sft`: instruction or conversation tuning of a causal LM; the loss sees the response / assistant tokens only.

The declaration every command reads; the implementation is tasks/sft.py, imported when a method needs it.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from peftlab.tasks.base import Exported, Prepared, Task, TaskView

if TYPE_CHECKING:
    from pathlib import Path

    from peftlab.config import Recipe
    from peftlab.engines import EngineResult
    from peftlab.runs import RunDir


def _impl() -> ModuleType:
    from peftlab.tasks import sft

    return sft


class SftTask(Task):
    # dolly, messages (OpenAI), sharegpt, prompt_completion (TRL): data/conversations.py detects which
    columns = ("instruction", "context", "response", "category", "messages", "conversations", "prompt", "completion")
    loss_kind = "causal_lm"
    objectives = ("eval_loss",)
    view = TaskView(("steps_per_s", "samples_per_s", "tokens_per_s", "eval_loss", "perplexity"),
                    (("eval_loss", "final_train_loss"),), ("tokens_per_s", "samples_per_s"))
    samples = ("generations",)

    def prepare(self, recipe: Recipe, run: RunDir) -> Prepared:
        return _impl().prepare(recipe, run)

    def save(self, run: RunDir, prepared: Prepared) -> None:
        _impl().save(run, prepared)

    def finish(self, run: RunDir, prepared: Prepared, result: EngineResult) -> dict[str, Any]:
        return _impl().finish(run, prepared, result)

    def doctor(self, recipe: Recipe) -> list[str]:
        return _impl().doctor(recipe)

    def generate(self, run: RunDir, recipe: Recipe, prompts: list[str], max_new_tokens: int | None = None,
                 seeds: list[int] | None = None, steps: int | None = None) -> list[str]:
        """Greedy answers: a `> prompt` line, then the answer."""
        sft = _impl()
        model, tokenizer = sft.load_for_inference(run, recipe)
        style = run.summary().get("data_format", {}).get("prompt_style", "dolly")  # runs before it were dolly
        return [line for text in prompts
                for line in (f"> {text}", sft.generate(model, tokenizer, text, recipe, max_new_tokens, style))]

    def export(self, run: RunDir, recipe: Recipe, folder: Path) -> Exported:
        return _impl().export(run, recipe, folder)
