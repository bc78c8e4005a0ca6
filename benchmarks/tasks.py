"""Benchmark tasks: one YAML file each (plus an optional Python hook), found by scanning folders.

    task: merging-seeds            # the name `zoo bench` takes
    version: 1                     # bump when the protocol or its settings change meaning
    description: ...
    protocol: merge                # how methods are scored (registry.PROTOCOLS)
    zoo: digits-mlp                # default zoo (`zoo bench --zoo` overrides)
    select: SELECT model_id FROM models WHERE zoo = $zoo   # optional; $zoo is the zoo's name
    settings: {inputs: seeds}      # the protocol's declared settings
    hook: my_methods.py            # optional, beside the YAML: imported first, may register methods
    methods:
      - method: uniform_soup
      - method: interpolation
        sweep: {alpha: [0.0, 0.5, 1.0]}   # one run per value (several keys: their product)
        parameters: {}                      # fixed parameters
    metrics: [test_acc, gain_over_best]   # optional: which of the protocol's metrics to show, in
                                          # order (the first ranks); default: all of them

A metric's direction (higher or lower is better) is declared by the protocol, once
(`register_protocol(..., metrics={"test_acc": "higher", ...})`), not by the task.

Built-in tasks are in benchmarks/tasks/; `--include-path DIR` adds a user's folder (scanned
recursively). A task in an included folder replaces a built-in one of the same name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoo.catalog import first_error
from zoo.errors import ZooError, one_line

from .registry import Method, Parameters, Protocol, get_method, get_protocol

BUILTIN_TASKS = Path(__file__).parent / "tasks"


class MethodEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: int = Field(1, ge=1)
    description: str = ""
    protocol: str
    zoo: str | None = None
    select: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    hook: str | None = None
    methods: list[MethodEntry] = Field(min_length=1)
    metrics: list[str] | None = Field(None, min_length=1)  # (None: all the protocol's)


@dataclass(frozen=True)
class MethodCall:
    """One method with one set of parameters, as a task runs it."""

    method: Method
    parameters: Parameters

    @property
    def parameters_json(self) -> str:
        return json.dumps(self.parameters.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def parameters_hash(self) -> str:
        return hashlib.sha256(f"{self.method.name}:{self.parameters_json}".encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        values = self.parameters.model_dump(mode="json")
        return self.method.name + (f"({', '.join(f'{k}={v}' for k, v in values.items())})" if values else "")


@dataclass(frozen=True)
class Task:
    config: TaskConfig
    path: Path
    protocol: Protocol
    settings: Parameters
    calls: list[MethodCall]

    @property
    def name(self) -> str:
        return self.config.task

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics the task shows and stores, in order (the first ranks the leaderboard)."""
        return tuple(self.config.metrics) if self.config.metrics else self.protocol.metric_names

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Each shown metric's direction, as its protocol declares it."""
        directions = self.protocol.higher_is_better
        return {name: directions[name] for name in self.metrics}

    def select(self, methods: list[str] | None) -> list[MethodCall]:
        """The calls of the methods named (all when None); an unknown name is an error."""
        if not methods:
            return self.calls
        names = {c.method.name for c in self.calls}
        for name in methods:
            if name not in names:
                raise ZooError(f"task {self.name!r} has no method {name!r}; its methods: {', '.join(sorted(names))}")
        return [c for c in self.calls if c.method.name in methods]


def load_task(path: str | Path) -> Task:
    """Read and validate one task file; every error names the file and the field."""
    path = Path(path)
    where = str(path)
    try:
        body = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ZooError(f"cannot read task file {where}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ZooError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(body, dict):
        raise ZooError(f"{where}: a task file is a mapping (task:, protocol:, methods:, metrics:)")
    shown = body.get("metrics")
    for k, metric in enumerate(shown if isinstance(shown, list) else []):
        if isinstance(metric, dict):  # the old form {name: ..., higher_is_better: ...}
            raise ZooError(f"{where}, field 'metrics.{k}': name the metric only (metrics: [test_acc, ...]); "
                           f"its direction is declared by the protocol")
    try:
        config = TaskConfig(**body)
    except ValidationError as e:
        field, message = first_error(e)
        raise ZooError(f"{where}, field {field!r}: {message}") from None
    if config.hook:
        _import_hook(path.parent / config.hook, where)
    protocol = get_protocol(config.protocol, f"{where}, field 'protocol'")
    try:
        settings = protocol.settings(**config.settings)
    except ValidationError as e:
        field, message = first_error(e, "settings")
        raise ZooError(f"{where}, field {field!r}: {message}") from None
    known = protocol.metric_names
    for k, metric in enumerate(config.metrics or []):
        if metric not in known:
            raise ZooError(f"{where}, field 'metrics.{k}': task {config.task!r}: protocol {protocol.name!r} reports no "
                           f"metric {metric!r}; it reports: {', '.join(known)}")
        if metric in config.metrics[:k]:
            raise ZooError(f"{where}, field 'metrics.{k}': task {config.task!r} lists metric {metric!r} twice")
    calls = []
    for k, entry in enumerate(config.methods):
        label = f"{where}, field 'methods.{k}'"
        method = get_method(entry.method, label)
        if method.kind != protocol.kind:
            raise ZooError(f"{label}: method {method.name!r} is a {method.kind} method; "
                           f"protocol {protocol.name!r} scores {protocol.kind} methods")
        overlap = set(entry.sweep) & set(entry.parameters)
        if overlap:
            raise ZooError(f"{label}: parameter {sorted(overlap)[0]!r} is both fixed and swept")
        keys = list(entry.sweep)
        for values in itertools.product(*(entry.sweep[key] for key in keys)):
            calls.append(MethodCall(method, method.validate({**entry.parameters, **dict(zip(keys, values))}, label)))
    return Task(config, path, protocol, settings, calls)


def discover_tasks(include_paths: list[str | Path] | None = None) -> dict[str, Path]:
    """Task name -> file, from the built-in folder and then each included folder."""
    found: dict[str, Path] = {}
    for folder in [BUILTIN_TASKS, *(Path(p) for p in include_paths or [])]:
        if not folder.is_dir():
            raise ZooError(f"--include-path {folder}: no such folder")
        local: dict[str, Path] = {}
        for path in sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml")):
            try:
                body = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ZooError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
            if not isinstance(body, dict) or "task" not in body:
                continue  # not a task file (a hook's own data, say)
            name = str(body["task"])
            if name in local:
                raise ZooError(f"task {name!r} is defined twice: {local[name]} and {path}")
            local[name] = path
        found.update(local)
    return found


def find_task(name_or_path: str, include_paths: list[str | Path] | None = None) -> Task:
    """A task by name (built-in or in an included folder) or by the path of its YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_task(name_or_path)
    tasks = discover_tasks(include_paths)
    if name_or_path not in tasks:
        raise ZooError(f"unknown task {name_or_path!r}; known: {', '.join(sorted(tasks))}")
    return load_task(tasks[name_or_path])


def _import_hook(path: Path, where: str) -> None:
    """Import a task's Python hook (it registers its methods or protocols when imported)."""
    if not path.is_file():
        raise ZooError(f"{where}, field 'hook': no file {path}")
    name = "zoo_task_hook_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ZooError as e:  # a registration refused (a duplicate name, a method of the wrong shape)
        del sys.modules[name]
        raise ZooError(f"{where}, field 'hook': {path}: {one_line(e)}") from None
    except Exception as e:  # a user's file: any error is reported as theirs, in one line
        del sys.modules[name]
        raise ZooError(f"{where}, field 'hook': importing {path} failed: {type(e).__name__}: {one_line(e)}") from None
