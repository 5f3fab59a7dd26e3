"""Task `classify`: sequence classification with a decoder LM and a new head (Banking77 intents).

The declaration every command reads; the implementation is tasks/classify.py, imported when a method needs it.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from peftlab.tasks.base import Task, TaskView

if TYPE_CHECKING:
    from peftlab.config import Recipe
    from peftlab.runs import RunDir


class ClassifyTask(Task):
    columns = ("text", "label")
    loss_kind = "sequence_classification"
    objectives = ("eval_loss", "eval_accuracy", "eval_f1", "eval_f1_weighted")
    view = TaskView(("samples_per_s", "tokens_per_s", "eval_f1", "test_accuracy", "test_f1"),
                    (("test_accuracy", "eval_accuracy"), ("test_f1", "eval_f1")), ("tokens_per_s", "samples_per_s"))
    samples = ("confusion_matrix",)

    def implementation(self) -> ModuleType:
        from peftlab.tasks import classify

        return classify

    def trial_overrides(self, recipe: Recipe) -> dict[str, Any]:
        return {"data.classify.test": None}  # trials never look at the test set (only --final does)

    def generate(self, run: RunDir, recipe: Recipe, prompts: list[str], max_new_tokens: int | None = None,
                 seeds: list[int] | None = None, steps: int | None = None) -> list[str]:
        """The predicted label per text: a `> text` line, then `label (probability)`."""
        classify = self.implementation()
        model, tokenizer, labels = classify.load_for_inference(run, recipe)
        predicted = classify.predict(model, tokenizer, labels, prompts, recipe.data.max_length)
        return [line for text, (label, probability) in zip(prompts, predicted, strict=True)
                for line in (f"> {text}", f"{label} ({probability:.3f})")]

