"""Task `diffusion`: text-to-image LoRA/QLoRA on a Stable Diffusion UNet (noise prediction).

The declaration every command reads; the implementation is tasks/diffusion.py, imported when a method needs it.
There is no validation set: the sweep objective is the last logging window's training loss (noise-prediction
MSE at random timesteps, so compare trials of the same step count and seed).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from peftlab.tasks.base import Task, TaskView

if TYPE_CHECKING:
    from peftlab.config import Recipe
    from peftlab.runs import RunDir


class DiffusionTask(Task):
    columns = ("image", "caption")
    loss_kind = "custom"
    objectives = ("final_train_loss", "mean_train_loss")
    view = TaskView(("it_per_s",), (("final_train_loss",), ("it_per_s",)), ("it_per_s", "steps_per_s"))
    samples = ("images",)

    def implementation(self) -> ModuleType:
        from peftlab.tasks import diffusion

        return diffusion

    def generate(self, run: RunDir, recipe: Recipe, prompts: list[str], max_new_tokens: int | None = None,
                 seeds: list[int] | None = None, steps: int | None = None) -> list[str]:
        """PNG files under samples/generated/, one per prompt and seed: their paths."""
        diffusion = self.implementation()
        pipeline = diffusion.load_for_inference(run, recipe)
        paths = diffusion.generate_images(pipeline, recipe, prompts, run.samples_path / "generated", seeds, steps)
        return [str(path) for path in paths]

