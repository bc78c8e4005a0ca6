"""The weights of a population as a torch Dataset: what weight-space learning trains on.

    ds = WeightDataset(z, "SELECT model_id FROM models WHERE zoo = 'digits-mlp'", permute=True)
    item = ds[0]   # {"weights": (P,) float32, "model_id", "test_acc", "train_acc", "gap",
                   #  "load", "temperature", "seed", "epoch", "phase"}

The weights are read once (`Root.weights`, one N x P read). With `layers=True` an item's
"weights" is the model's state dict instead of one flat vector. With `permute=True` every read
applies a fresh random permutation of the hidden units (`zoo.permutations`), which changes the
weights and leaves the function unchanged: the standard augmentation for weight-space models.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from .architectures import build_model
from .errors import ZooError
from .permutations import permutation_spec, permute_state, random_permutations
from .weights import unflatten

UNLABELLED = "unlabelled"  # the phase of a model whose cell has no label (before `zoo phases`)


class WeightDataset(Dataset):
    """The models `select` names (an SQL query returning model_id, or a list of ids)."""

    def __init__(self, zoo, select: str | list[str], epoch: int | None = None, layers: bool = False,
                 permute: bool = False, buffers: bool = False, seed: int = 0):
        if isinstance(select, str):
            chosen = zoo.sql(select)
            if "model_id" not in chosen.columns:
                raise ZooError("WeightDataset: the query must return a model_id column")
            select = list(chosen["model_id"])
        ids = list(dict.fromkeys(select))
        if not ids:
            raise ZooError("WeightDataset: the query selects no models")
        counts = zoo.sql("select count(distinct n_params) as n from models where model_id in (select unnest(?))", [ids])
        if int(counts["n"].iloc[0]) > 1:
            raise ZooError("WeightDataset: the models have different parameter counts; select one architecture and width")
        self.properties = properties(zoo, ids, epoch)
        # (one dict per model, made once: a pandas row per item cost 80 us of a 180 us item)
        self._items = [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                       for row in self.properties.to_dict("records")]
        self.matrix = zoo.weights(ids, epoch=epoch, buffers=True)
        spec = zoo.spec(ids[0])
        self.index = zoo.tensor_index(ids[0])
        self.n_params = int(sum(e.numel for e in self.index if e.kind == "parameter"))
        self.layers, self.permute, self.buffers = layers, permute, buffers
        self.spec = permutation_spec(build_model(spec.architecture, spec.input_shape, spec.n_classes)) if permute else None
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.matrix)

    def __getitem__(self, i: int) -> dict:
        item = dict(self._items[i])
        vector = self.matrix[i]
        if self.permute or self.layers:
            state = unflatten(vector, self.index)
            if self.permute:
                state = permute_state(state, self.spec, random_permutations(self.spec, self._stream()))
            if self.layers:
                item["weights"] = state if self.buffers else {e.name: state[e.name] for e in self.index if e.kind == "parameter"}
                return item
            vector = torch.cat([state[e.name].reshape(-1).float() for e in self.index])
        item["weights"] = vector if self.buffers else vector[: self.n_params]
        return item

    def _stream(self) -> torch.Generator:
        """The permutations' generator. In a DataLoader worker it is reseeded from the worker's
        seed (which differs per worker and per epoch): a copy of the parent's generator would
        give every worker, and every epoch of re-forked workers, the same permutations."""
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.generator = torch.Generator().manual_seed((self.seed * 1_000_003 + info.seed) % 2**63)
        return self.generator


def properties(zoo, model_ids: list[str], epoch: int | None = None) -> pd.DataFrame:
    """One row per model, in the given order: its grid position, seed, accuracies and gap at
    `epoch` (default: its last), and its cell's phase (from the last labelled epoch, or
    "unlabelled")."""
    frame = zoo.sql(
        "select m.model_id, m.zoo, m.load, m.temperature, m.seed, c.epoch, c.train_acc, c.test_acc, "
        "c.train_acc - c.test_acc as gap, c.train_loss, c.test_loss "
        "from models m join curves c on c.model_id = m.model_id "
        "and c.epoch = coalesce(?, json_extract(m.config, '$.training.epochs')::int) "
        "where m.model_id in (select unnest(?))",
        [epoch, model_ids],
    ).set_index("model_id")
    missing = [m for m in model_ids if m not in frame.index]
    if missing:
        raise ZooError(f"no curve row for model {missing[0]!r} at epoch {epoch if epoch is not None else 'final'}")
    frame = frame.loc[model_ids].reset_index()
    labels = phase_labels(zoo)
    frame["phase"] = [labels.get((z, l, t), UNLABELLED) for z, l, t in zip(frame["zoo"], frame["load"], frame["temperature"])]
    frame["epoch"] = frame["epoch"].astype(int)
    return frame


def phase_labels(zoo) -> dict[tuple[str, float, float], str]:
    """(zoo name, load, temperature) -> the phase of that cell at its zoo's last labelled epoch
    (the `cells` table that `zoo phases` writes); cells without a label are left out."""
    if "cells" not in zoo.store.tables():
        return {}
    cells = zoo.sql("select zoo, load, temperature, phase from cells c where epoch = "
                    "(select max(epoch) from cells d where d.zoo = c.zoo)")
    return {(z, l, t): p for z, l, t, p in cells.itertuples(index=False) if isinstance(p, str)}
