"""Task `sft`: instruction or conversation tuning of a causal LM; the loss sees the response / assistant tokens only.

The declaration every command reads; the implementation is tasks/sft.py, imported when a method needs it.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from peftlab.tasks.base import Task, TaskView
from peftlab.watch.progress import phase

if TYPE_CHECKING:
    from peftlab.config import Recipe
    from peftlab.runs import RunDir


class SftTask(Task):
    # dolly, messages (OpenAI), sharegpt, prompt_completion (TRL): data/conversations.py detects which
    columns = ("instruction", "context", "response", "category", "messages", "conversations", "prompt", "completion")
    loss_kind = "causal_lm"
    objectives = ("eval_loss",)
    view = TaskView(("steps_per_s", "samples_per_s", "tokens_per_s", "eval_loss", "perplexity"),
                    (("eval_loss", "final_train_loss"),), ("tokens_per_s", "samples_per_s"))
    samples = ("generations",)

    def implementation(self) -> ModuleType:
        from peftlab.tasks import sft

        return sft

    def generate(self, run: RunDir, recipe: Recipe, prompts: list[str], max_new_tokens: int | None = None,
                 seeds: list[int] | None = None, steps: int | None = None) -> list[str]:
        """Greedy answers: a `> prompt` line, then the answer."""
        sft = self.implementation()
        model, tokenizer = sft.load_for_inference(run, recipe)
        style = run.summary().get("data_format", {}).get("prompt_style", "dolly")  # runs before it were dolly
        lines = []
        with phase("generating", len(prompts)) as progress:
            for text in prompts:
                lines += [f"> {text}", sft.generate(model, tokenizer, text, recipe, max_new_tokens, style)]
                progress.advance()
        return lines

