"""The typed contract of every method kind and of protocols, checked when one is registered.

Each kind of method is called by its protocols in one way, with three positional arguments:

    merging     (states: list[StateDict], p: Parameters, ctx: MergeContext, /) -> StateDict
    pruning     (model: nn.Module, p: Parameters, generator: torch.Generator, /) -> dict[str, torch.Tensor]
    prediction  (kind: PredictionKind, p: Parameters, seed: int, /) -> Estimator
    generation  (weights: torch.Tensor, p: Parameters, ctx: GenerationContext, /) -> torch.Tensor

and every protocol as

    protocol    (unit: UnitContext, call: MethodCall, settings: Parameters, /) -> Scores

`p` is an instance of the method's declared parameters (`settings`: the protocol's declared
settings). The arguments are passed by position, so a function may name them as it likes; what
`check_signature` refuses is a function that cannot be called so (too few or too many required
positional parameters, a required keyword-only one) or whose annotations disagree with the
contract (a parameter annotated with a type the contract does not pass, `p` annotated with a
class that is not a base of the declared parameters, a return type the protocol does not take).
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import torch
from torch import nn

from zoo.catalog import ModelSpec
from zoo.errors import ZooError
from zoo.settings import Settings

from .evaluation import StateDict

if TYPE_CHECKING:  # (they import the registry: resolved lazily, see `_resolve_contract`)
    from .runner import UnitContext
    from .tasks import MethodCall


class Parameters(Settings):
    """Base class of a method's declared parameters: unknown keys are errors (zoo.settings)."""


# --------------------------------------------------------------------------- what methods get


@dataclass
class MergeContext:
    """What a merge method may use besides its inputs."""

    template: torch.nn.Module
    val_accuracy: Callable[[StateDict], float]
    base: StateDict | None  # the pre-trained model of task-vector merges
    seed: int


@dataclass
class GenerationContext:
    """What a generation method may use besides the population's weights."""

    model_spec: ModelSpec  # the population's config (architecture, input shape, classes)
    index: list  # the flat layout (zoo.weights.TensorEntry)
    n: int  # models to generate
    generator: torch.Generator
    seed: int


PredictionKind = Literal["regression", "classification"]


class Estimator(typing.Protocol):
    """What a prediction method returns: a scikit-learn style estimator. `x` is the rows'
    `benchmarks.prediction.ModelInputs` (their weight statistics, and their state dicts and
    networks on demand); `prediction.on_statistics(...)` makes a pipeline that reads the
    statistics."""

    def fit(self, x: typing.Any, y: np.ndarray) -> Estimator: ...

    def predict(self, x: typing.Any) -> np.ndarray: ...


# {metric: value}, or rows {"metric", "value"[, "phase"]}
Scores = Union[Mapping[str, float], list[Mapping[str, Any]]]


# --------------------------------------------------------------------------- the contracts


class MergeMethod(typing.Protocol):
    """merging: one merged state dict from the protocol's `states` (a cell's seeds, a model's
    checkpoints, or fine-tuned models whose base is `ctx.base`)."""

    def __call__(self, states: list[StateDict], p: Parameters, ctx: MergeContext, /) -> StateDict: ...


class PruneMethod(typing.Protocol):
    """pruning: a 0/1 mask per prunable weight (layer name -> mask of its weight's shape)."""

    def __call__(self, model: nn.Module, p: Parameters, generator: torch.Generator, /) -> dict[str, torch.Tensor]: ...


class PredictionMethod(typing.Protocol):
    """prediction: an unfitted estimator for `kind` ("regression" of a property, or
    "classification" of the phase)."""

    def __call__(self, kind: PredictionKind, p: Parameters, seed: int, /) -> Estimator: ...


class GenerationMethod(typing.Protocol):
    """generation: (ctx.n, P) new flat weight vectors from the (N, P) population `weights`."""

    def __call__(self, weights: torch.Tensor, p: Parameters, ctx: GenerationContext, /) -> torch.Tensor: ...


class ProtocolFunction(typing.Protocol):
    """A protocol: the scores of `call` (a method with its parameters) on one `unit`."""

    def __call__(self, unit: UnitContext, call: MethodCall, settings: Parameters, /) -> Scores: ...


METHOD_CONTRACTS: dict[str, type] = {
    "merging": MergeMethod,
    "pruning": PruneMethod,
    "prediction": PredictionMethod,
    "generation": GenerationMethod,
}
KINDS = tuple(METHOD_CONTRACTS)
MethodFunction = Union[MergeMethod, PruneMethod, PredictionMethod, GenerationMethod]


# --------------------------------------------------------------------------- the check


class _Shown:
    """An annotation as written (so a signature prints `p: Trim`, not `p: 'Trim'`)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _readable(signature: inspect.Signature) -> str:
    def plain(annotation):
        return _Shown(annotation) if isinstance(annotation, str) else annotation

    parameters = [p.replace(annotation=plain(p.annotation)) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=plain(signature.return_annotation)))


def contract_signature(contract: type, declared: type | None = None) -> str:
    """The contract's signature as text, `p`'s type replaced by the declared class if given."""
    signature = inspect.signature(contract.__call__)
    parameters = list(signature.parameters.values())[1:]  # (not self)
    if declared is not None:
        parameters = [p.replace(annotation=declared.__name__) if p.annotation == "Parameters" else p for p in parameters]
    return _readable(signature.replace(parameters=parameters))


def check_signature(what: str, function: Callable, contract: type, declared: type) -> None:
    """Refuse, in one line, a `function` that cannot serve as `contract` (see the module's
    docstring); `declared` is the class of the argument the contract types `Parameters` (a
    method's declared parameters, a protocol's declared settings)."""
    expected = contract_signature(contract, declared)
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise ZooError(f"{what}: {function!r} has no signature to check; expected {expected}") from None
    problem = _shape_problem(signature, contract) or _annotation_problem(function, signature, contract, declared)
    if problem:
        raise ZooError(" ".join(f"{what} has the signature {_readable(signature)}, but {problem}; "
                                f"expected {expected}".split()))


def _contract_parameters(contract: type) -> list[inspect.Parameter]:
    return list(inspect.signature(contract.__call__).parameters.values())[1:]


def _shape_problem(signature: inspect.Signature, contract: type) -> str | None:
    n = len(_contract_parameters(contract))
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    keyword = [p.name for p in parameters if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if len(required) > n:
        return f"it requires {len(required)} positional arguments and is passed {n}"
    if len(positional) < n and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return f"it takes {len(positional)} positional argument{'s' * (len(positional) != 1)} and is passed {n}"
    if keyword:
        return f"its keyword-only argument {keyword[0]!r} is never passed"
    return None


def _annotation_problem(function: Callable, signature: inspect.Signature, contract: type, declared: type) -> str | None:
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    scope = _scope(function)
    for mine, theirs in zip(positional, _contract_parameters(contract)):
        if mine.annotation is mine.empty:
            continue
        annotated = _resolve(mine.annotation, scope)
        is_declared = theirs.annotation == "Parameters"
        passed = declared if is_declared else _resolve_contract(theirs.annotation)
        if annotated is not None and passed is not None and not _accepts(annotated, passed):
            shown = f"an instance of {declared.__name__}" if is_declared else _name(theirs.annotation)
            return f"its argument {mine.name!r} is annotated {_name(mine.annotation)} and is passed {shown}"
    if signature.return_annotation is not signature.empty:
        returned = _resolve(signature.return_annotation, scope)
        wanted = _resolve_contract(inspect.signature(contract.__call__).return_annotation)
        if returned is not None and wanted is not None and not _accepts(wanted, returned):
            return f"it returns {_name(signature.return_annotation)}"
    return None


def _scope(function: Callable) -> dict[str, Any]:
    """The names a function's (string) annotations are written in: its module's."""
    try:
        function = inspect.unwrap(function)
    except ValueError:
        pass
    scope = getattr(function, "__globals__", None)
    if scope is None:  # a callable object
        module = sys.modules.get(getattr(function, "__module__", None) or "")
        scope = vars(module) if module else {}
    return scope


def _resolve_contract(annotation):
    """A contract's annotation as an object. UnitContext and MethodCall live in modules that
    import this one: they are looked up only when needed, and during the package's own import
    (when no built-in protocol annotates them) they stay unresolved, so unchecked."""
    resolved = _resolve(annotation, globals())
    if resolved is None:
        try:
            from .runner import UnitContext
            from .tasks import MethodCall
        except ImportError:
            return None
        resolved = _resolve(annotation, {**globals(), "UnitContext": UnitContext, "MethodCall": MethodCall})
    return resolved


def _name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation)


def _resolve(annotation, scope: Mapping[str, Any]):
    """The annotation as an object, or None where it cannot be evaluated (then it is not checked)."""
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, dict(scope))  # noqa: S307  (what typing.get_type_hints does)
        except Exception:
            return None
    return type(None) if annotation is None else annotation


def _members(annotation) -> tuple | None:
    if typing.get_origin(annotation) is Union or isinstance(annotation, types.UnionType):
        return typing.get_args(annotation)
    return None


def _accepts(wide, narrow) -> bool:
    """Whether every value of type `narrow` is a value of type `wide`, as far as can be told
    (what cannot be told, a protocol class or a type variable, is accepted)."""
    if wide is Any or wide is object or narrow is Any:
        return True
    if (members := _members(narrow)) is not None:
        return all(_accepts(wide, m) for m in members)
    if (members := _members(wide)) is not None:
        return any(_accepts(m, narrow) for m in members)
    if typing.get_origin(narrow) is Literal:
        values = typing.get_args(narrow)
        if typing.get_origin(wide) is Literal:
            return set(values) <= set(typing.get_args(wide))
        return all(_accepts(wide, type(v)) for v in values)
    if typing.get_origin(wide) is Literal:
        return False
    wide_class, narrow_class = typing.get_origin(wide) or wide, typing.get_origin(narrow) or narrow
    if not (isinstance(wide_class, type) and isinstance(narrow_class, type)):
        return True
    if wide_class in (float, complex) and narrow_class in (int, float, bool):  # PEP 484's numeric tower
        return True
    try:
        return issubclass(narrow_class, wide_class)
    except TypeError:  # a typing.Protocol that is not runtime-checkable
        return True
