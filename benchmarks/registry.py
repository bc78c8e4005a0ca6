"""Methods and protocols, registered by name (the mergekit pattern).

A *method* is one downstream technique (a merge, a pruning rule, a predictor). It declares its
parameters as a pydantic model, so a task YAML that names an unknown parameter or a bad value
is refused with the field's name before anything runs:

    class SoupParameters(Parameters):
        k: int = Field(5, ge=1)

    @register_method("epoch_soup", kind="merging", parameters=SoupParameters)
    def epoch_soup(states, p: SoupParameters, context): ...

A *protocol* is how a task scores the methods of one kind: what a unit is (a cell of the grid,
one model, or the whole selected population), what it hands the method, and which metrics it
returns. Built-in protocols live beside their methods (merging.py, pruning.py, ...); a task's
Python hook can register more of either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import ValidationError

from zoo.catalog import first_error
from zoo.errors import ZooError
from zoo.registry import Registry
from zoo.settings import Settings

Unit = Literal["cell", "model", "population"]


class Parameters(Settings):
    """Base class of a method's declared parameters: unknown keys are errors (zoo.settings)."""


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    parameters: type[Parameters]
    function: Callable[..., Any]
    doc: str

    def validate(self, values: dict[str, Any], where: str) -> Parameters:
        """The parameters `values` as this method's model; a clear error naming `where`."""
        try:
            return self.parameters(**values)
        except ValidationError as e:
            field, message = first_error(e)
            raise ZooError(f"{where}: method {self.name!r}, parameter {field!r}: {message}") from None


@dataclass(frozen=True)
class Protocol:
    name: str
    kind: str
    unit: Unit
    settings: type[Parameters]
    metrics: tuple[str, ...]
    function: Callable[..., Any]
    doc: str


METHODS: Registry[Method] = Registry("method")
PROTOCOLS: Registry[Protocol] = Registry("protocol")


def register_method(name: str, kind: str, parameters: type[Parameters] = Parameters):
    """Register `function(inputs, parameters, context)` as the method `name` of `kind`."""

    def wrap(function):
        METHODS.add(name, Method(name, kind, parameters, function, (function.__doc__ or "").strip()), function)
        return function

    return wrap


def register_protocol(name: str, kind: str, unit: Unit, metrics: tuple[str, ...], settings: type[Parameters] = Parameters):
    """Register `function(unit, call, settings) -> {metric: value}` (or a list of
    {"metric", "value", ["phase"]} rows) as the protocol `name`, which scores methods of `kind`
    on each `unit` and reports `metrics`."""

    def wrap(function):
        PROTOCOLS.add(name, Protocol(name, kind, unit, settings, tuple(metrics), function, (function.__doc__ or "").strip()), function)
        return function

    return wrap


def get_method(name: str, where: str) -> Method:
    return METHODS.find(name, where)


def get_protocol(name: str, where: str) -> Protocol:
    return PROTOCOLS.find(name, where)
