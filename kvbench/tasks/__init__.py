"""Task registry: every module in `kvbench/tasks/` is imported here, which registers its tasks."""

import importlib
import pkgutil

from kvbench.tasks.base import TASKS, Sample, Task, build_task, register_task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TASKS", "Sample", "Task", "build_task", "register_task"]
