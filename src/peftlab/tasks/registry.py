"""The task registry: task name -> its `Task` declaration.

A leaf module, so that recipe validation (config.py) reads it without importing a task implementation.
The registration lines are in peftlab/tasks/__init__.py, which Python runs before this module is used.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import PeftlabError, did_you_mean

# name -> an instance of a tasks.base.Task subclass. Typed Any: naming Task here would tie this leaf (which
# config.py reads) to the interface module, which names the recipe and engine types in turn.
_TASKS: dict[str, Any] = {}


def register_task(name: str, task_class: type) -> None:
    """Make `recipe.task: name` mean `task_class` for every command (peft's register_peft_method, for tasks)."""
    if name in _TASKS:
        raise ValueError(f"task '{name}' is already registered")
    task = task_class()
    task.name = name
    _TASKS[name] = task


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def get_task(name: str) -> Any:
    """The declaration (a tasks.base.Task) of task `name`; an unknown name is a one-line error."""
    if name not in _TASKS:
        raise PeftlabError(f"task '{name}': unknown; {did_you_mean(name, _TASKS)}")
    return _TASKS[name]

