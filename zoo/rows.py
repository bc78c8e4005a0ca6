"""The rows one trained model, one launch and one failure add to a root, built for the store to
write: a model's tensors, curves and checkpoints, then its `models` row (the commit), the
`jobs` table's record of which job trains which model, and a model's `failures` row; and the
part names of the other layers' rows (metrics, cells, benchmark results), one home for each."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .schemas import SCHEMAS
from .storage import Store, safe_name
from .weights import TensorEntry, n_parameters, sha256

if TYPE_CHECKING:
    from .catalog import ModelSpec


def metric_part_key(family: str, ids: list[str], epoch: int, digest: str) -> str:
    """The part a metric family's rows for one model (or pair) at one epoch and settings go to."""
    return f"{family}-{'-'.join(ids)}-e{epoch}-{digest}"


def cells_part_key(epoch: int) -> str:
    """The part a zoo's phase labels at one epoch go to."""
    return f"cells-e{epoch}"


def benchmark_part_key(task: str, version: int, parameters_hash: str) -> str:
    """The part one benchmark method call's results (every unit) go to."""
    return f"{task}-v{version}-{parameters_hash}"


@dataclass
class TrainedModel:
    """What training produces for one model, in the form the store writes."""

    spec: "ModelSpec"
    curves: list[dict]  # one row per epoch 0..E: epoch, train_loss, train_acc, test_loss, test_acc
    checkpoints: dict[int, np.ndarray]  # epoch -> flat float32 state (see zoo.weights)
    index: list[TensorEntry]
    train_seconds: float
    resumed_from: int | None = None  # the epoch a resumed run continued after (not stored)


def write_model(store: Store, model: TrainedModel, code_version: str) -> None:
    """Store one model as per-model parts: tensors, curves, checkpoints, then its `models` row
    (the commit)."""
    _write_parts(store, model.spec, model_tables(model, code_version))


def _write_parts(store: Store, spec, tables: dict[str, pa.Table]) -> None:
    for table, rows in tables.items():  # (`models` last)
        store.write_part(table, spec.zoo, spec.model_id, rows)
    store.remove_part("failures", spec.zoo, spec.model_id)


def write_models(store: Store, models: list[TrainedModel], code_version: str) -> list[str]:
    """Store several models of one zoo (a trained stack) as one pack per table, the `models`
    pack last (the commit), skipping any model another run stored meanwhile; returns the ids
    stored. Four files instead of four per model: a 32-model stack's parts took 0.5 s of CPU and
    ~380 fsyncs, and `zoo generate` then spent 2 s merging a 256-model run's parts into packs
    (both measured here). See `zoo.packing.write_models` for how a crash is survived."""
    from . import packing

    if not models:
        return []
    zoo = models[0].spec.zoo
    tables = [model_tables(m, code_version) for m in models]
    ids = packing.write_models(store, zoo, {t: [rows[t] for rows in tables] for t in tables[0]})
    if ids is None:  # the packer's lock stayed busy: as parts, which the next `pack` merges
        stored = store.stored_ids("models", zoo)
        ids = [m.spec.model_id for m in models if m.spec.model_id not in stored]
        for model, rows in zip(models, tables):
            if model.spec.model_id in ids:
                _write_parts(store, model.spec, rows)
        return ids
    for model_id in ids:
        store.remove_part("failures", zoo, model_id)
    return ids


def model_tables(model: TrainedModel, code_version: str) -> dict[str, pa.Table]:
    """One model's rows of each table it is stored in, `models` last."""
    import torch

    spec, model_id = model.spec, model.spec.model_id
    index = model.index
    tensors = pa.Table.from_pylist(
        [
            {"model_id": model_id, "position": i, "name": e.name, "shape": list(e.shape), "offset": e.offset,
             "numel": e.numel, "dtype": e.dtype, "kind": e.kind}
            for i, e in enumerate(index)
        ],
        schema=SCHEMAS["tensors"],
    )
    curves = pa.Table.from_pylist([{"model_id": model_id, **row} for row in model.curves], schema=SCHEMAS["curves"])
    n_params = n_parameters(index)
    epochs = sorted(model.checkpoints)
    vectors = [model.checkpoints[e] for e in epochs]
    checkpoints = pa.table(
        {
            "model_id": [model_id] * len(epochs),
            "epoch": pa.array(epochs, pa.int32()),
            "n_params": [n_params] * len(epochs),
            "n_values": [int(v.size) for v in vectors],
            "sha256": [sha256(v) for v in vectors],
            "weights": pa.ListArray.from_arrays(
                pa.array(np.cumsum([0] + [v.size for v in vectors]), pa.int32()),
                pa.array(np.concatenate(vectors) if vectors else np.zeros(0, np.float32), pa.float32()),
            ),
        },
        schema=SCHEMAS["checkpoints"],
    )
    row = {
        "model_id": model_id,
        "zoo": spec.zoo,
        "arch": spec.architecture["name"],
        "dataset": spec.dataset["name"],
        "seed": spec.seed,
        "load_name": spec.load_name,
        "load": spec.load,
        "temperature_name": spec.temperature_name,
        "temperature": spec.temperature,
        "n_params": n_params,
        "status": "done",
        "train_seconds": model.train_seconds,
        "created_at": datetime.now(timezone.utc),
        "code_version": code_version,
        "torch_version": torch.__version__,
        "config": spec.to_json(),
    }
    fields = list(SCHEMAS["models"])
    for name, (value, kind) in spec.hyperparameters().items():
        if name not in row:
            row[name] = value if value is None or kind is not str else str(value)
            fields.append(pa.field(name, _ARROW_TYPES[kind]))
    models = pa.Table.from_pylist([row], schema=pa.schema(fields))
    return {"tensors": tensors, "curves": curves, "checkpoints": checkpoints, "models": models}


def write_jobs(store: Store, zoo: str, run: str, executor: str, jobs: list[tuple[str, str]]) -> None:
    """Record which job trains which model ((model_id, job_id) pairs), one part per run,
    rewritten as the run submits more jobs: `zoo status` reads it."""
    now = datetime.now(timezone.utc)
    store.write_part("jobs", zoo, safe_name("run", run), pa.Table.from_pylist(
        [{"model_id": m, "zoo": zoo, "job_id": j, "executor": executor, "run": run, "submitted_at": now} for m, j in jobs],
        schema=SCHEMAS["jobs"]))


def write_failure(store: Store, zoo: str, model_id: str, error: str, job_id: str = "") -> None:
    store.write_part(
        "failures",
        zoo,
        model_id,
        pa.Table.from_pylist(
            [{"model_id": model_id, "zoo": zoo, "error": error, "job_id": job_id, "failed_at": datetime.now(timezone.utc)}],
            schema=SCHEMAS["failures"],
        ),
    )


_ARROW_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
