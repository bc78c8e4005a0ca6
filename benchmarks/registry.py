"""Methods and protocols, registered by name (the mergekit pattern).

A *method* is one downstream technique (a merge, a pruning rule, a predictor). It declares its
parameters as a pydantic model, so a task YAML that names an unknown parameter or a bad value
is refused with the field's name before anything runs:

    class SoupParameters(Parameters):
        k: int = Field(5, ge=1)

    @register_method("epoch_soup", kind="merging", parameters=SoupParameters)
    def epoch_soup(states, p: SoupParameters, ctx): ...

Each kind has one typed contract (benchmarks/contracts.py: `MergeMethod`, `PruneMethod`,
`PredictionMethod`, `GenerationMethod`), checked when the method is registered: a function that
cannot be called the way its kind's protocols call it, or whose annotations disagree with the
contract, is refused with one line naming the method, its signature and the expected one.

A *protocol* is how a task scores the methods of one kind: what a unit is (a cell of the grid,
one model, or the whole selected population), what it hands the method, and which metrics it
returns, each declared with its direction (`metrics={"test_acc": "higher", "acc_drop":
"lower"}`); task files only choose which of them to show. Its function has one contract too
(`ProtocolFunction`: `(unit, call, settings)`). Built-in protocols live beside their methods
(merging.py, pruning.py, ...); a task's Python hook can register more of either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import ValidationError

from zoo.catalog import first_error
from zoo.errors import ZooError
from zoo.registry import Registry, definition_site

from .contracts import KINDS, METHOD_CONTRACTS, MethodFunction, Parameters, ProtocolFunction, check_signature

Unit = Literal["cell", "model", "population"]
Direction = Literal["higher", "lower"]  # which way a metric is better


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    parameters: type[Parameters]
    function: MethodFunction
    doc: str

    def validate(self, values: dict[str, Any], where: str) -> Parameters:
        """The parameters `values` as this method's model; a clear error naming `where`."""
        try:
            return self.parameters(**values)
        except ValidationError as e:
            field, message = first_error(e)
            raise ZooError(f"{where}: method {self.name!r}, parameter {field!r}: {message}") from None


@dataclass(frozen=True)
class Metric:
    """A metric a protocol reports, with the direction in which it is better (declared once,
    by the protocol; stored with every result as `higher_is_better`)."""

    name: str
    higher_is_better: bool


@dataclass(frozen=True)
class Protocol:
    name: str
    kind: str
    unit: Unit
    settings: type[Parameters]
    metrics: tuple[Metric, ...]
    function: ProtocolFunction
    doc: str

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {m.name: m.higher_is_better for m in self.metrics}


METHODS: Registry[Method] = Registry("method")
PROTOCOLS: Registry[Protocol] = Registry("protocol")


def register_method(name: str, kind: str, parameters: type[Parameters] = Parameters):
    """Register `function` as the method `name` of `kind`; it must fit the kind's contract
    (benchmarks.contracts.METHOD_CONTRACTS), e.g. a merging method `(states, p, ctx) -> state`."""

    def wrap(function):
        what = f"{kind} method {name!r} ({definition_site(function)})"
        if kind not in METHOD_CONTRACTS:
            raise ZooError(f"method {name!r} ({definition_site(function)}): unknown kind {kind!r}; "
                           f"known: {', '.join(KINDS)}")
        _check_class(what, "parameters", parameters)
        check_signature(what, function, METHOD_CONTRACTS[kind], parameters)
        METHODS.add(name, Method(name, kind, parameters, function, (function.__doc__ or "").strip()), function)
        return function

    return wrap


def register_protocol(name: str, kind: str, unit: Unit, metrics: Mapping[str, Direction],
                      settings: type[Parameters] = Parameters):
    """Register `function(unit, call, settings) -> {metric: value}` (or a list of
    {"metric", "value", ["phase"]} rows) as the protocol `name`, which scores methods of `kind`
    on each `unit` and reports `metrics`: {name: "higher" or "lower"}, which way each is better,
    in the order a task shows them by default."""

    def wrap(function):
        what = f"protocol {name!r} ({definition_site(function)})"
        if kind not in METHOD_CONTRACTS:
            raise ZooError(f"{what}: unknown kind {kind!r}; known: {', '.join(KINDS)}")
        if unit not in get_args(Unit):
            raise ZooError(f"{what}: unknown unit {unit!r}; known: {', '.join(get_args(Unit))}")
        declared = _metrics(what, metrics)
        _check_class(what, "settings", settings)
        check_signature(what, function, ProtocolFunction, settings)
        PROTOCOLS.add(name, Protocol(name, kind, unit, settings, declared, function, (function.__doc__ or "").strip()), function)
        return function

    return wrap


def _metrics(what: str, metrics: Any) -> tuple[Metric, ...]:
    directions = get_args(Direction)
    if not isinstance(metrics, Mapping) or not metrics:
        raise ZooError(f"{what}: metrics are declared with their direction, e.g. "
                       f"metrics={{'test_acc': 'higher', 'acc_drop': 'lower'}}; got {metrics!r}")
    for metric, direction in metrics.items():
        if not isinstance(metric, str) or direction not in directions:
            raise ZooError(f"{what}: metric {metric!r} has direction {direction!r}; "
                           f"a metric's direction is {' or '.join(map(repr, directions))}")
    return tuple(Metric(metric, direction == "higher") for metric, direction in metrics.items())


def _check_class(what: str, field: str, value: Any) -> None:
    if not (isinstance(value, type) and issubclass(value, Parameters)):
        raise ZooError(f"{what}: {field}={value!r} is not a subclass of benchmarks.Parameters")


def get_method(name: str, where: str) -> Method:
    return METHODS.find(name, where)


def get_protocol(name: str, where: str) -> Protocol:
    return PROTOCOLS.find(name, where)
