"""The Python API: `z = zoo.open(root)`, then SQL, models, weights and exports.

    z.sql("select * from models where zoo = 'digits-mlp'")   -> pandas DataFrame
    z.load_model(model_id, epoch=None)                         -> torch module, stored weights
    z.weights(model_ids, epoch=None)                           -> (N, P) float32 tensor
    z.export(model_id, "model.safetensors")                    -> safetensors file

Everything is rebuilt from what the root stores (the model's config and weights), so any later
stage can load any model without knowing how it was trained. Nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import sql as zsql
from .architectures import build_model
from .catalog import ModelSpec
from .datasets import Data, load_dataset, with_path
from .errors import ZooError
from .published import PublishedStore, is_published
from .storage import Store, safe_name
from .weights import TensorEntry, unflatten


class Root:
    """A zoo root opened for reading (the handle `zoo.open` returns; by convention `z`): the
    stored models of every zoo under it."""

    def __init__(self, root: str | os.PathLike | None = None, timeout: float | None = None, memory_limit: str | None = None,
                 recover: bool = False, storage_options: dict | None = None):
        # a zoo root on this machine, or a published zoo (a URL, or a folder with a manifest)
        self.store = PublishedStore(str(root), storage_options) if root is not None and is_published(root) else Store(root)
        if isinstance(self.store, Store):
            self.store.repair_index()  # (a moved or copied root: zoo.duckdb's views point to the old place)
        self.root = self.store.root
        self._con = zsql.Connection(self.store, timeout=timeout, memory_limit=memory_limit, recover=recover)
        self._specs: dict[str, ModelSpec] = {}  # a model id is the hash of its config: safe to cache

    def __repr__(self) -> str:
        return f"zoo.open({str(self.root)!r})"

    def sql(self, query: str, params: list | dict | None = None) -> pd.DataFrame:
        """Run a read-only SQL query over the zoo's views; returns a DataFrame."""
        with self.store.reading():  # (no part file is removed or renamed during the query)
            return self._con.query(query, params)

    def models(self, zoo: str | None = None) -> pd.DataFrame:
        where = "where zoo = ?" if zoo else ""
        return self.sql(f"select * from models {where} order by zoo, load, temperature, seed", [zoo] if zoo else [])

    def spec(self, model_id: str) -> ModelSpec:
        """The full config of a stored model."""
        return self.specs([model_id])[model_id]

    def specs(self, model_ids: Sequence[str]) -> dict[str, ModelSpec]:
        """The full configs of several stored models, read in one query."""
        wanted = [m for m in dict.fromkeys(model_ids) if m not in self._specs]
        for model_id in wanted:
            safe_name("model id", model_id)
        if wanted:
            rows = self.sql("select model_id, config, n_params from models where model_id in (select unnest(?))", [wanted])
            for model_id, config, n_params in rows.itertuples(index=False):
                # a zoo may come from anyone: its configs are checked (bounds, budgets) before
                # anything is built from them, and must describe the weights the table counts
                try:
                    spec = ModelSpec.from_json(config)
                    if (counted := spec.count_parameters()) != n_params:
                        raise ZooError(f"field 'architecture': {counted:,} parameters, "
                                       f"but the models table says {n_params}")
                except ZooError as e:
                    raise ZooError(f"model {model_id!r} in {self.root}: stored config, {e}") from None
                self._specs[model_id] = spec
        missing = [m for m in model_ids if m not in self._specs]
        if missing:
            raise ZooError(f"no model {missing[0]!r} in {self.root}")
        return {m: self._specs[m] for m in model_ids}

    def data(self, model_id: str, path: str | os.PathLike | None = None) -> Data:
        """The data set (with its fixed split) that the model was trained on. A `path` stored in
        the model's config is never followed (a zoo may come from anyone): a data set read from a
        folder is read from `path` if given, else from its default location (env, then ./data)."""
        return load_dataset(with_path(self.spec(model_id).dataset, path))

    def load_model(self, model_id: str, epoch: int | None = None) -> nn.Module:
        """The model with its stored weights at `epoch` (default: the last), in eval mode."""
        spec = self.spec(model_id)
        epoch = spec.training.epochs if epoch is None else int(epoch)
        vector = self._vectors(spec.zoo, [model_id], epoch)[0]
        model = build_model(spec.architecture, spec.input_shape, spec.n_classes)
        model.load_state_dict(unflatten(vector, self.tensor_index(model_id)))
        return model.eval()

    def weights(self, model_ids: Sequence[str], epoch: int | None = None, buffers: bool = False) -> torch.Tensor:
        """The trainable weights of N models as one (N, P) float32 tensor, rows in the given
        order (with `buffers`, BatchNorm statistics and counters are appended). `epoch=None` takes
        each model's last epoch. The models must share a parameter layout."""
        model_ids = list(model_ids)
        if not model_ids:
            return torch.zeros(0, 0)
        for model_id in model_ids:
            safe_name("model id", model_id)
        # (the last epoch is read from the config only when it is needed: the JSON costs)
        last = "json_extract(config, '$.training.epochs')::int" if epoch is None else str(int(epoch))
        info = self.sql(f"select model_id, zoo, n_params, {last} as epochs from models where model_id in (select unnest(?))",
                        [model_ids])
        rows = {m: (z, int(n), int(e)) for m, z, n, e in zip(*(info[c].tolist() for c in ("model_id", "zoo", "n_params", "epochs")))}
        missing = [m for m in model_ids if m not in rows]
        if missing:
            raise ZooError(f"no model {missing[0]!r} in {self.root}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if info["n_params"].nunique() > 1:
            raise ZooError("weights(): the models have different parameter counts; select one architecture and width")
        groups: dict[tuple[str, int], list[str]] = {}
        for m in model_ids:
            z, _, e = rows[m]
            groups.setdefault((z, e), []).append(m)
        if len(groups) == 1:  # one zoo and recipe: the matrix comes back in the requested order
            ((zoo, epochs),) = groups
            matrix = self._vectors(zoo, model_ids, epochs)
        else:
            by_id = {}
            for (zoo, epochs), ids in groups.items():
                by_id.update(zip(ids, self._vectors(zoo, ids, epochs)))
            matrix = np.stack([by_id[m] for m in model_ids])
        if not buffers:
            matrix = matrix[:, : rows[model_ids[0]][1]]
        return torch.from_numpy(np.ascontiguousarray(matrix))

    def export(self, model_id: str, path: str | os.PathLike, epoch: int | None = None) -> Path:
        """Write the model's state dict to a safetensors file, with its id, epoch and config as
        metadata. `path` is relative to the working directory, without a `..` component: an
        absolute path or one that climbs out is refused."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_absolute() or ".." in path.parts:
            raise ZooError(f"refused export path {str(path)!r}: give a path relative to the working directory, without '..'")
        spec = self.spec(model_id)
        epoch = spec.training.epochs if epoch is None else int(epoch)
        state = unflatten(self._vectors(spec.zoo, [model_id], epoch)[0], self.tensor_index(model_id))
        metadata = {"model_id": model_id, "epoch": str(epoch), "config": spec.to_json()}
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
        except OSError as e:
            raise ZooError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    # --- reading part files --------------------------------------------------------------

    def _vectors(self, zoo: str, model_ids: list[str], epoch: int) -> np.ndarray:
        """(N, n_values) float32: the stored flat states of models of one zoo at one epoch."""
        matrix, lacking = self.store.read_weights(zoo, model_ids, epoch)
        if lacking:
            raise ZooError(f"no checkpoint at epoch {epoch} for model {lacking[0]!r}")
        return matrix

    def tensor_index(self, model_id: str) -> list[TensorEntry]:
        """Where each tensor of the model's state lies in its flat weight vector (zoo.weights)."""
        safe_name("model id", model_id)
        rows = self.sql("select name, shape, \"offset\", numel, dtype, kind from tensors where model_id = ? order by position",
                        [model_id])
        if rows.empty:
            raise ZooError(f"no tensor index for model {model_id!r} in {self.root}")
        return [TensorEntry(r.name, tuple(int(x) for x in r.shape), int(r.offset), int(r.numel), r.dtype, r.kind)
                for r in rows.itertuples(index=False)]
