"""Tasks: what is trained and how it is judged. One line per task registers it (see tasks/base.py)."""

from peftlab.tasks.base import Prepared, Task, TaskView
from peftlab.tasks.classify_task import ClassifyTask
from peftlab.tasks.diffusion_task import DiffusionTask
from peftlab.tasks.registry import get_task, register_task, task_names
from peftlab.tasks.sft_task import SftTask

register_task("sft", SftTask)
register_task("classify", ClassifyTask)
register_task("diffusion", DiffusionTask)

__all__ = ["Prepared", "Task", "TaskView", "get_task", "register_task", "task_names"]
