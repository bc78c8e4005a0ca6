"""`deepsets`: a learned, permutation-invariant model over a network's raw weights.

A network's function does not change when the units of a hidden layer are permuted
(`zoo.permutations`). This model treats each hidden layer's units as a set (Zaheer et al. 2017's
DeepSets; the invariant neural functionals of Zhou et al. 2023 go further by also mixing
layers). A unit is described by everything the layer's permutation moves with it: its rows,
columns and entries in each tensor of `zoo.permutations.permutation_spec`'s group. Where that
slice has no other permuted axis (a first layer's row over the input pixels, a last hidden
layer's column over the classes, its bias) it is used raw; where another layer's permutation
also acts on it (a middle layer's row) it enters through order-free statistics (mean, std, min,
max, quartiles). A shared MLP maps every unit, the units are pooled (mean and max, and the log
of their count, so models of different widths share one network), and a second MLP maps the
pooled layers with the tensors no permutation moves (the output bias) to the prediction. The
result is invariant to every hidden-unit permutation exactly, up to float summation order.

`augment` trains on randomly permuted weights each epoch (fresh permutations of every training
model's units), the data augmentation non-invariant weight-space models need. For this model a
permutation of the weights permutes the rows of each unit set and nothing else (a test checks
this), so it is done that way, and it changes the predictions only by rounding: the table shows
what invariance by construction buys.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from zoo.architectures import build_model
from zoo.permutations import PermutationSpec, permutation_spec

from .prediction import ModelInputs
from .registry import Parameters, register_method

QUANTILES = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)


def unit_sets(state: dict[str, torch.Tensor], parameters: set[str], spec: PermutationSpec) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(one (units, features) float32 matrix per hidden layer of `spec`, the vector of the
    parameters no permutation moves). Buffers (BatchNorm statistics) are left out."""
    moved: dict[str, set[int]] = {}
    for group in spec:
        for a in group.axes:
            moved.setdefault(a.name, set()).add(a.axis)
    sets = []
    for group in spec:
        columns = []
        for a in group.axes:
            if a.name not in parameters:
                continue
            tensor = state[a.name].double()
            slices = tensor.movedim(a.axis, 0).reshape(group.size, -1)  # unit j: its `block` rows
            columns.append(_statistics(slices) if moved[a.name] - {a.axis} else slices)
        sets.append(torch.cat(columns, 1).float())
    fixed = [state[name].reshape(-1).float() for name in sorted(parameters) if name not in moved]
    return sets, torch.cat(fixed) if fixed else torch.zeros(0)


def _statistics(slices: torch.Tensor) -> torch.Tensor:
    """Order-free statistics of each row: mean, std, min, max, quartiles."""
    return torch.cat([slices.mean(1, keepdim=True), slices.std(1, correction=0, keepdim=True),
                      slices.amin(1, keepdim=True), slices.amax(1, keepdim=True),
                      torch.quantile(slices, QUANTILES, dim=1).T], 1)


class DeepSets(nn.Module):
    """phi per hidden layer (shared over its units), pooled by mean, max and log count; rho on
    the pooled layers and the fixed parameters."""

    def __init__(self, unit_features: list[int], fixed: int, hidden: int, outputs: int):
        super().__init__()
        self.phi = nn.ModuleList(nn.Sequential(nn.Linear(f, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
                                 for f in unit_features)
        self.rho = nn.Sequential(nn.Linear(len(unit_features) * (2 * hidden + 1) + fixed, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

    def forward(self, sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], fixed: torch.Tensor) -> torch.Tensor:
        """`sets`: per layer (all units of the batch's models stacked, each unit's model index,
        units per model); `fixed`: (models, fixed parameters)."""
        pooled = []
        for phi, (units, owner, counts) in zip(self.phi, sets):
            h = phi(units)
            total = torch.zeros(len(counts), h.shape[1]).index_add_(0, owner, h)
            largest = torch.full((len(counts), h.shape[1]), -torch.inf).scatter_reduce(
                0, owner[:, None].expand_as(h), h, "amax")
            pooled += [total / counts[:, None], largest, counts.log()[:, None]]
        return self.rho(torch.cat(pooled + [fixed], 1))


class DeepSetsParameters(Parameters):
    hidden: int = Field(64, ge=1, description="width of phi and rho")
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1, description="models per step")
    lr: float = Field(1e-3, gt=0.0, description="Adam's step size")
    weight_decay: float = Field(1e-4, ge=0.0)
    augment: bool = Field(False, description="train on randomly permuted units each epoch")


@register_method("deepsets", kind="prediction", parameters=DeepSetsParameters)
def deepsets(kind: str, p: DeepSetsParameters, seed: int):
    """A DeepSets network over each hidden layer's units (raw weights, invariant to hidden-unit
    permutations), with or without permutation augmentation."""
    return DeepSetsEstimator(kind, p, seed)


class DeepSetsEstimator:
    def __init__(self, kind: str, p: DeepSetsParameters, seed: int):
        self.kind, self.p, self.seed = kind, p, seed

    # -- features --------------------------------------------------------------------------

    def rows(self, inputs: ModelInputs) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """Each row's unit sets and fixed parameters (computed once per row and shared)."""
        specs: dict[int, tuple[PermutationSpec, set[str]]] = {}

        def compute(i: int, state: dict[str, torch.Tensor]):
            model_id = inputs.model_ids[i]
            key = sum(t.numel() for t in state.values())
            if key not in specs:
                spec = inputs.handle.spec(model_id)
                module = build_model(spec.architecture, spec.input_shape, spec.n_classes)
                specs[key] = (permutation_spec(module), {n for n, kind in inputs.kinds(i).items() if kind == "parameter"})
            return unit_sets(state, specs[key][1], specs[key][0])

        return inputs.per_row("deepsets", compute)

    def _standardise(self, rows) -> None:
        n_sets = len(rows[0][0])
        self.set_mean = [torch.cat([r[0][k] for r in rows]).mean(0) for k in range(n_sets)]
        self.set_std = [torch.cat([r[0][k] for r in rows]).std(0, correction=0).clamp_min(1e-8) for k in range(n_sets)]
        fixed = torch.stack([r[1] for r in rows])
        self.fixed_mean, self.fixed_std = fixed.mean(0), fixed.std(0, correction=0).clamp_min(1e-8)

    def _standardised(self, rows) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """`rows` on the training rows' scale (once per fit or predict, not once per step)."""
        return [([(x - m) / s for x, m, s in zip(sets, self.set_mean, self.set_std)],
                 (fixed - self.fixed_mean) / self.fixed_std) for sets, fixed in rows]

    @staticmethod
    def _batch(rows, generator=None):
        """Standardised rows as the network's input: per layer, all units stacked with their
        owners and counts."""
        sets = []
        for k in range(len(rows[0][0])):
            parts = [r[0][k] for r in rows]
            if generator is not None:  # permutation augmentation: a fresh order of every model's units
                parts = [x[torch.randperm(len(x), generator=generator)] for x in parts]
            counts = torch.tensor([len(x) for x in parts], dtype=torch.float32)
            owner = torch.repeat_interleave(torch.arange(len(parts)), counts.long())
            sets.append((torch.cat(parts), owner, counts))
        return sets, torch.stack([r[1] for r in rows])

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, inputs: ModelInputs, y: np.ndarray) -> DeepSetsEstimator:
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        rows = self.rows(inputs)
        self._standardise(rows)
        rows = self._standardised(rows)
        if self.kind == "regression":
            y = np.asarray(y, np.float64)
            self.y_mean, self.y_std = float(y.mean()), float(y.std()) or 1.0
            target = torch.tensor((y - self.y_mean) / self.y_std, dtype=torch.float32)[:, None]
            loss_fn, outputs = nn.functional.mse_loss, 1
        else:
            self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
            target = torch.from_numpy(codes.astype(np.int64))
            loss_fn, outputs = nn.functional.cross_entropy, len(self.classes_)
        self.net = DeepSets([s.shape[1] for s in rows[0][0]], len(rows[0][1]), self.p.hidden, outputs)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=self.p.lr, weight_decay=self.p.weight_decay)
        self.net.train()
        for _ in range(self.p.epochs):
            order = torch.randperm(len(rows), generator=generator)
            for start in range(0, len(rows), self.p.batch_size):
                chosen = order[start : start + self.p.batch_size].tolist()
                sets, fixed = self._batch([rows[i] for i in chosen], generator=generator if self.p.augment else None)
                loss = loss_fn(self.net(sets, fixed), target[chosen])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        self.net.eval()
        return self

    def predict(self, inputs: ModelInputs) -> np.ndarray:
        with torch.no_grad():
            out = self.net(*self._batch(self._standardised(self.rows(inputs))))
        if self.kind == "regression":
            return out[:, 0].double().numpy() * self.y_std + self.y_mean
        return self.classes_[out.argmax(1).numpy()]
