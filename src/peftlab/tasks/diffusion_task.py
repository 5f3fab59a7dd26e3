"""Task `diffusion`: text-to-image LoRA/QLoRA on a Stable Diffusion UNet (noise prediction).

The declaration every command reads; the implementation is tasks/diffusion.py, imported when a method needs it.
There is no validation set: the sweep objective is the last logging window's training loss (noise-prediction
MSE at random timesteps, so compare trials of the same step count and seed).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from peftlab.tasks.base import Prepared, Task, TaskView

if TYPE_CHECKING:
    from peftlab.config import Recipe
    from peftlab.engines import EngineResult
    from peftlab.runs import RunDir


def _impl() -> ModuleType:
    from peftlab.tasks import diffusion

    return diffusion


class DiffusionTask(Task):
    columns = ("image", "caption")
    loss_kind = "custom"
    objectives = ("final_train_loss", "mean_train_loss")
    view = TaskView(("it_per_s",), (("final_train_loss",), ("it_per_s",)), ("it_per_s", "steps_per_s"))
    samples = ("images",)

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
        """PNG files under samples/generated/, one per prompt and seed: their paths."""
        diffusion = _impl()
        pipeline = diffusion.load_for_inference(run, recipe)
        paths = diffusion.generate_images(pipeline, recipe, prompts, run.samples_path / "generated", seeds, steps)
        return [str(path) for path in paths]
