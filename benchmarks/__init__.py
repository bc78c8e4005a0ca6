"""benchmarks: downstream methods (merging, pruning, property prediction) scored against a
zoo, phase by phase, with a leaderboard.

    from benchmarks import find_task, run_task, leaderboard
    task = find_task("merging-seeds")
    run_task(zoo.open("zoo-data"), task, "digits-mlp")

Importing the package registers the built-in methods and protocols.
"""

from . import deepsets, generation, merging, prediction, probing, pruning  # noqa: F401  (they register themselves)
from .leaderboard import leaderboard, render
from .registry import METHODS, PROTOCOLS, Parameters, register_method, register_protocol
from .runner import run_task
from .tasks import discover_tasks, find_task, load_task

__all__ = ["METHODS", "PROTOCOLS", "Parameters", "discover_tasks", "find_task", "leaderboard", "load_task",
           "register_method", "register_protocol", "render", "run_task"]
