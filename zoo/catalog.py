"""The catalog: which zoos exist, and the fully resolved config of every model in each.

A zoo is a grid: a load-like axis x a temperature-like axis x seeds, each axis setting one
hyperparameter (an architecture option such as `width`, a data set option such as `train_size`,
or a training field such as `batch_size` or `lr`). `ZooConfig.models()` expands the grid into
`ModelSpec`s; a model's id is a hash of its spec, so the same config is the same model wherever
and whenever it is trained.

Errors are `CatalogError`s naming the zoo and the field, e.g.
`catalog.yaml: zoo 'smoke', field 'training.lr': Input should be greater than 0`.

A `ModelSpec` is also read back from a zoo's `models` table, and a zoo may come from anyone. So a
spec is checked whenever one is made (from the catalog or from stored JSON), before anything is
built or loaded: every option within the bounds its architecture or data set declares, seeds in
0..2^63-1, the input shape and class count those of the data set, and the model's parameter
count and a generated data set's size (both counted from the options, nothing allocated) within
their budgets (env ZOO_MAX_PARAMS, ZOO_MAX_DATA_VALUES). A stored spec that fails is a one-line
`ConfigError` naming the field. The checks add no field, so every model id stays as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .architectures import check_parameters, get_architecture
from .datasets import MAX_SEED, check_data_size, describe_dataset, get_dataset_type
from .errors import CatalogError, ZooError
from .settings import Settings

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalog.yaml"


class Strict(Settings):
    """(the catalog's sections: see zoo.settings)"""


class Axis(Strict):
    name: str = Field(description="the hyperparameter this axis sets")
    values: list[int | float] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _distinct(cls, values):
        if len(set(values)) != len(values):
            raise ValueError("values must be distinct")
        return values


class Training(Strict):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "onecycle", "step"] = "constant"
    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(32, ge=1)
    steps_per_epoch: int | None = Field(
        None, ge=1, description="fixed SGD steps per epoch (a data-size axis then keeps the step budget)"
    )
    augmentation: Literal["none", "flip-crop", "flip-crop-rotate"] = "none"
    crop_padding: int = Field(2, ge=0)
    rotation_degrees: float = Field(15.0, ge=0, le=180, description="flip-crop-rotate: angles uniform in +-this")
    micro_batch_size: int | None = Field(
        None, ge=1, description="gradient accumulation: each batch runs in chunks of this many samples, one step per batch")
    precision: Literal["float32", "bf16"] = Field("float32", description="bf16: autocast the forward pass (GPUs)")
    channels_last: bool = Field(False, description="image batches and convolutions in channels-last memory layout")
    deterministic: bool = Field(True, description="on CUDA, deterministic kernels only (a rerun gives the same bits)")
    eval_batch_size: int = Field(2048, ge=1)


class Launch(Strict):
    """How jobs are launched; every field can be overridden on the command line."""

    partition: str | None = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    timeout_min: int = Field(60, ge=2)
    signal_delay_s: int = Field(90, ge=10, description="SLURM warns a job this long before its time limit; it then requeues itself")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = Field(64, ge=1)
    models_per_job: int | None = Field(None, ge=1)
    extra: dict[str, str] = Field(default_factory=dict, description="further sbatch arguments")


class ZooConfig(Strict):
    name: str
    description: str
    dataset: dict[str, Any]
    architecture: dict[str, Any]
    load: Axis
    temperature: Axis
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(min_length=1)
    training: Training
    checkpoints: list[int] = Field(min_length=1, description="epochs to store; must hold 0 and the last (or: every)")
    metrics: dict[str, Any] = Field(default_factory=dict, description="settings of the metric families")
    launch: Launch = Launch()
    cluster: bool = Field(False, description="a cluster job (GPU-days): `zoo generate` needs --executor slurm or --allow-local")

    @model_validator(mode="before")
    @classmethod
    def _every_epoch(cls, body):
        """`checkpoints: every` stands for every epoch, 0 to the last."""
        if isinstance(body, dict) and body.get("checkpoints") == "every":
            epochs = body.get("training", {}).get("epochs") if isinstance(body.get("training"), dict) else None
            if isinstance(epochs, int) and not isinstance(epochs, bool) and 0 < epochs <= 100_000:
                body = {**body, "checkpoints": list(range(epochs + 1))}
        return body

    @model_validator(mode="after")
    def _check(self):
        for section in ("dataset", "architecture"):
            if not isinstance(getattr(self, section).get("name"), str):
                raise _FieldError(f"{section}.name", "required: the registered name")
        if len(set(self.seeds)) != len(self.seeds):
            raise _FieldError("seeds", "seeds must be distinct")
        if self.load.name == self.temperature.name:
            raise _FieldError("temperature.name", f"both axes set {self.load.name!r}")
        return self

    def select_epochs(self, epoch: str, allow_all: bool = True) -> list[int]:
        """The `--epoch` argument of every command: 'final' -> the last epoch, 'all' (where
        `allow_all`) -> every checkpoint, or one checkpoint epoch."""
        choices = "final, all or an epoch number" if allow_all else "final or an epoch number"
        if epoch == "final":
            return [self.training.epochs]
        if epoch == "all" and allow_all:
            return sorted(self.checkpoints)
        try:
            value = int(epoch)
        except ValueError:
            raise ZooError(f"--epoch takes {choices}, not {epoch!r}") from None
        if value not in self.checkpoints:
            raise ZooError(f"epoch {value} is not a checkpoint of {self.name}; checkpoints: {sorted(self.checkpoints)}")
        return [value]

    @property
    def grid_size(self) -> int:
        return len(self.load.values) * len(self.temperature.values) * len(self.seeds)

    def models(self) -> list["ModelSpec"]:
        """Every model of the grid, in load, temperature, seed order."""
        return [
            _resolve(self, load, temperature, seed)
            for load in self.load.values
            for temperature in self.temperature.values
            for seed in self.seeds
        ]


class ModelSpec(Strict):
    """The complete config of one model: everything needed to train it or rebuild it."""

    zoo: str
    dataset: dict[str, Any]
    architecture: dict[str, Any]
    training: Training
    seed: int = Field(ge=0, le=MAX_SEED)
    checkpoints: list[int]
    load_name: str
    load: float
    temperature_name: str
    temperature: float
    input_shape: list[int]
    n_classes: int

    @model_validator(mode="after")
    def _within_bounds(self):
        """Options within their bounds, the input shape and classes the data set's, the model and
        its data within their budgets: all from the options, before anything is built or loaded."""
        data_kind, data_options = _section_options(self, "dataset", get_dataset_type)
        arch, arch_options = _section_options(self, "architecture", get_architecture)
        shape, n_classes = data_kind.describe(data_options)
        if list(shape) != self.input_shape or n_classes != self.n_classes:
            raise ConfigError("input_shape", f"input shape {self.input_shape} and {self.n_classes} classes are not "
                                             f"those of the data set ({list(shape)}, {n_classes})")
        for field, check in (("dataset", lambda: check_data_size(data_kind, data_options)),
                             ("architecture", lambda: check_parameters(arch, arch_options, tuple(shape), n_classes))):
            try:
                check()
            except ZooError as e:
                raise ConfigError(field, str(e)) from None
        return self

    def count_parameters(self) -> int:
        """The model's parameter count (buffers not included), from its options: nothing is built."""
        arch, options = _section_options(self, "architecture", get_architecture)
        return arch.count(options, tuple(self.input_shape), self.n_classes)

    @property
    def model_id(self) -> str:
        """A stable hash: options left at their defaults are not part of it, so adding a new
        option with a default later leaves every existing id unchanged."""
        core = self.model_dump(exclude_defaults=True, exclude={"input_shape", "n_classes"})
        blob = json.dumps(core, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """A spec from its JSON, as a zoo stores it; malformed or out of bounds: a ConfigError."""
        if not isinstance(text, (str, bytes)):
            raise ConfigError("config", f"expected JSON text, got {type(text).__name__}")
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            field, message = first_error(e)
            raise ConfigError(field or "config", message) from None

    def hyperparameters(self) -> dict[str, tuple[Any, type]]:
        """Every hyperparameter as one flat mapping name -> (value, declared type), the models
        table's columns. The type is the declared one (bool, int, float or str), so that an
        unset option (None) still gets a column of the right type."""
        sections = (
            ("dataset", self.dataset, get_dataset_type(self.dataset["name"]).options),
            ("arch", self.architecture, get_architecture(self.architecture["name"]).options),
            (None, self.training.model_dump(), Training),
        )
        flat: dict[str, tuple[Any, type]] = {}
        for name_column, values, model in sections:
            for key, value in values.items():
                if key == "name":
                    flat[name_column] = (value, str)
                else:
                    flat[key] = (value, _scalar_type(model.model_fields[key].annotation))
        return flat


def _scalar_type(annotation) -> type:
    """bool, int, float or str: the first of these that an annotation (maybe `X | None`) admits."""
    args = typing.get_args(annotation) or (annotation,)
    for kind in (bool, int, float, str):
        if kind in args:
            return kind
    return str


class ConfigError(ZooError):
    """A model config out of bounds or malformed: one line naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field, self.message = field, message


def _section_options(spec: ModelSpec, section: str, lookup):
    """(registered type, validated options) of a spec's 'dataset' or 'architecture' section."""
    values = dict(getattr(spec, section))
    name = values.pop("name", None)
    try:
        kind = lookup(name) if isinstance(name, str) else None
    except ZooError as e:
        raise ConfigError(f"{section}.name", str(e)) from None
    if kind is None:
        raise ConfigError(f"{section}.name", "required: the registered name")
    try:
        return kind, kind.options(**values)
    except ValidationError as e:
        field, message = first_error(e, section)
        value = e.errors()[0].get("input")
        shown = f" (got {value})" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise ConfigError(field, message + shown) from None


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _hyperparameter_home(config: ZooConfig, name: str) -> str:
    """Which section an axis's hyperparameter lives in: 'dataset', 'architecture' or 'training'."""
    if name in get_architecture(config.architecture["name"]).options.model_fields:
        return "architecture"
    if name in get_dataset_type(config.dataset["name"]).options.model_fields and name != "path":
        return "dataset"
    if name in Training.model_fields and name not in ("augmentation", "optimizer", "schedule"):
        return "training"
    raise ValueError(f"{name!r} is not a hyperparameter of {config.architecture['name']}, {config.dataset['name']} or training")


def _resolve(config: ZooConfig, load: float, temperature: float, seed: int) -> ModelSpec:
    sections = {
        "dataset": dict(config.dataset),
        "architecture": dict(config.architecture),
        "training": config.training.model_dump(),
    }
    for axis, value in ((config.load, load), (config.temperature, temperature)):
        sections[_hyperparameter_home(config, axis.name)][axis.name] = value
    dataset = get_dataset_type(sections["dataset"]["name"])
    arch = get_architecture(sections["architecture"]["name"])
    data_options = dataset.options(**{k: v for k, v in sections["dataset"].items() if k != "name"})
    arch_options = arch.options(**{k: v for k, v in sections["architecture"].items() if k != "name"})
    dataset_spec = {"name": dataset.name, **data_options.model_dump()}
    input_shape, n_classes = describe_dataset(dataset_spec)
    return ModelSpec(
        zoo=config.name,
        dataset=dataset_spec,
        architecture={"name": arch.name, **arch_options.model_dump()},
        training=Training(**sections["training"]),
        seed=seed,
        checkpoints=sorted(config.checkpoints),
        load_name=config.load.name,
        load=float(load),
        temperature_name=config.temperature.name,
        temperature=float(temperature),
        input_shape=list(input_shape),
        n_classes=n_classes,
    )


class Catalog:
    """The zoos of one catalog file, validated."""

    def __init__(self, zoos: dict[str, ZooConfig], path: Path):
        self.zoos, self.path = zoos, path

    def __getitem__(self, name: str) -> ZooConfig:
        if name not in self.zoos:
            raise ZooError(f"unknown zoo {name!r} in {self.path}; known zoos: {', '.join(self.zoos)}")
        return self.zoos[name]

    def __iter__(self):
        return iter(self.zoos.values())


def catalog_path(path: str | os.PathLike | None = None) -> Path:
    """The catalog to use: `path`, else env ZOO_CATALOG, else the shipped catalog.yaml."""
    return Path(path or os.environ.get("ZOO_CATALOG") or DEFAULT_CATALOG)


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    path = catalog_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise CatalogError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or set(raw) != {"zoos"} or not isinstance(raw["zoos"], dict) or not raw["zoos"]:
        raise CatalogError(f"{path}: expected one top-level key `zoos:` mapping zoo names to their settings")
    return Catalog({str(name): parse_zoo(str(name), body, path) for name, body in raw["zoos"].items()}, path)


def _numbers(value: Any, path: str = ""):
    """(dotted field, float) for every float inside a parsed YAML value."""
    if isinstance(value, float):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def parse_zoo(name: str, body: Any, path: Path | str = "catalog") -> ZooConfig:
    """Validate one zoo's settings; any problem is a one-line CatalogError naming zoo and field."""
    where = f"{Path(path).name}: zoo {name!r}"
    if not isinstance(body, dict):
        raise CatalogError(f"{where}: expected a mapping of settings, got {type(body).__name__}")
    if "name" in body:
        raise CatalogError(f"{where}, field 'name': not a setting (a zoo is named by its key under `zoos:`)")
    for field, value in _numbers(body):
        if not math.isfinite(value):  # also inside the free-form sections (dataset, architecture, metrics)
            raise CatalogError(f"{where}, field {field!r}: a number must be finite, got {value}")
    try:
        zoo = ZooConfig(name=name, **body)
    except ValidationError as e:
        raise CatalogError(f"{where}, {_describe(e)}") from None
    except _FieldError as e:
        raise CatalogError(f"{where}, field {e.field!r}: {e.message}") from None
    _check_resolvable(zoo, where)
    return zoo


def _check_resolvable(config: ZooConfig, where: str) -> None:
    """Check names, options and every axis value now, so that a bad catalog fails before any job."""
    for section, lookup in (("dataset", get_dataset_type), ("architecture", get_architecture)):
        fixed = dict(getattr(config, section))
        try:
            kind = lookup(fixed.pop("name"))
            kind.options(**fixed)
        except ZooError as e:
            raise CatalogError(f"{where}, field '{section}.name': {e}") from None
        except ValidationError as e:
            raise CatalogError(f"{where}, {_describe(e, prefix=section)}") from None
    for axis_field in ("load", "temperature"):
        try:
            _hyperparameter_home(config, getattr(config, axis_field).name)
        except ValueError as e:
            raise CatalogError(f"{where}, field '{axis_field}.name': {e}") from None
    if 0 not in config.checkpoints or config.training.epochs not in config.checkpoints:
        raise CatalogError(f"{where}, field 'checkpoints': must include 0 and the last epoch ({config.training.epochs})")
    if any(e < 0 or e > config.training.epochs for e in config.checkpoints):
        raise CatalogError(f"{where}, field 'checkpoints': epochs must lie in 0..{config.training.epochs}")
    for axis_field, axis in (("load", config.load), ("temperature", config.temperature)):
        for value in axis.values:
            load = value if axis_field == "load" else config.load.values[0]
            temperature = value if axis_field == "temperature" else config.temperature.values[0]
            try:
                spec = _resolve(config, load, temperature, config.seeds[0])
            except (ValidationError, ZooError) as e:
                reason = _describe(e, prefix=None) if isinstance(e, ValidationError) else getattr(e, "message", str(e))
                raise CatalogError(f"{where}, field '{axis_field}.values' ({axis.name}={value}): {reason}") from None
    if config.training.augmentation != "none" and len(spec.input_shape) != 3:
        raise CatalogError(f"{where}, field 'training.augmentation': {spec.dataset['name']} is not an image data set")


def first_error(e: ValidationError, prefix: str = "") -> tuple[str, str]:
    """(dotted field, message) of a validation error's first problem, e.g. ("training.lr",
    "Input should be greater than 0"); an unknown key reads "unknown field". Further problems
    are counted in the message."""
    errors = e.errors()
    first = errors[0]
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(first["loc"])), message


def _describe(e: ValidationError, prefix: str | None = "") -> str:
    """The first validation error as "field 'a.b': message"; prefix=None gives the bare message."""
    field, message = first_error(e, prefix or "")
    return message if prefix is None else f"field {field!r}: {message}"
