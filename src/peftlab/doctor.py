"""`peftlab doctor`: look at a recipe before spending GPU hours on it; each task declares its checks."""

from __future__ import annotations

from peftlab.config import Recipe
from peftlab.tasks import get_task


def run_doctor(recipe: Recipe) -> list[str]:
    """Print the checkup; return the list of problems (empty = healthy)."""
    return get_task(recipe.task).doctor(recipe)
