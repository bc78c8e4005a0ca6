"""Property prediction from weights: the protocol, its inputs, splits, and the methods that read
weight statistics.

What is predicted, per (model, checkpoint) row: test accuracy, generalisation gap, log load, log
temperature (R^2), the cell's phase (accuracy) and, where several checkpoints are used, the epoch
(R^2). Rows are split by model (a model's checkpoints stay together) or by cell (whole cells of
the grid held out: generalisation to hyperparameters never seen in training), with a seeded
split whose seed the stored settings record.

Every method gets the same `ModelInputs` (the rows' statistics, and their weights and models on
demand) and returns a scikit-learn style estimator. The statistics are the Unterthiner et al.
(2020) recipe: per trainable tensor (every weight and bias), the mean, variance and the
1/25/50/75/99th percentiles of its entries (`metrics.weightspace.layer_statistics`'s
definitions). Methods here read them: `constant` (the floor), `linear` (ridge / logistic
regression), `gbt` (gradient-boosted trees, scikit-learn's histogram GBT, as in Unterthiner et
al., who used LightGBM) and `statnn` (a small MLP). `benchmarks.deepsets` reads the raw weights,
`benchmarks.probing` only the models' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from zoo.population import properties
from zoo.weights import unflatten

from .registry import Parameters, register_method, register_protocol

LEVELS = (0.01, 0.25, 0.5, 0.75, 0.99)
TARGETS = ("test_acc", "gap", "log_load", "log_temperature", "epoch")  # R^2; the phase: accuracy


def weight_features(z, model_ids: list[str], epoch: int | None = None) -> np.ndarray:
    """(models, 7 x tensors) statistics of every trainable tensor, in float64, rows in the
    given order. Models of different widths have different tensor sizes but the same tensors,
    so they are read in groups of one parameter count and their statistics line up."""
    counts = z.sql("select model_id, zoo, n_params from models where model_id in (select unnest(?))", [model_ids])
    features: dict[str, np.ndarray] = {}
    for _, group in counts.groupby("n_params"):
        ids = list(group["model_id"])
        matrix = z.weights(ids, epoch=epoch)
        entries = [e for e in z.tensor_index(ids[0]) if e.kind == "parameter"]
        columns = []
        for e in entries:
            block = matrix[:, e.offset : e.offset + e.numel].double()
            columns += [block.mean(1, keepdim=True), block.var(1, correction=0, keepdim=True),
                        torch.quantile(block, torch.tensor(LEVELS, dtype=torch.float64), dim=1).T]
        features.update(zip(ids, torch.cat(columns, 1).numpy()))
    widths = {len(v) for v in features.values()}
    if len(widths) > 1:
        raise ValueError("the selected models have different numbers of weight tensors (select one depth)")
    return np.stack([features[m] for m in model_ids])


# --------------------------------------------------------------------------- what methods read


@dataclass
class ModelInputs:
    """The rows a prediction method fits on or scores: one per (model, epoch). `statistics` is
    there from the start; `states()` (each row's state dict, buffers included) is read on first
    use and shared by every subset, like what `per_row` computes from it."""

    handle: object  # the zoo.api.Root
    model_ids: list[str]
    epochs: list[int]
    statistics: np.ndarray
    _states: dict = field(default_factory=dict, repr=False)  # (model_id, epoch) -> state dict
    _memo: dict = field(default_factory=dict, repr=False)  # (what, model_id, epoch) -> per_row's value

    def __len__(self) -> int:
        return len(self.model_ids)

    def take(self, rows: np.ndarray) -> ModelInputs:
        """The subset at positions `rows`, sharing what was read."""
        return ModelInputs(self.handle, [self.model_ids[i] for i in rows], [self.epochs[i] for i in rows],
                           self.statistics[rows], self._states, self._memo)

    def states(self) -> list[dict[str, torch.Tensor]]:
        keys = list(zip(self.model_ids, self.epochs))
        todo = [k for k in dict.fromkeys(keys) if k not in self._states]
        if todo:
            groups: dict[tuple[int, int], list[str]] = {}
            counts = self.handle.sql("select model_id, n_params from models where model_id in (select unnest(?))",
                                     [[m for m, _ in todo]])
            n_params = dict(zip(counts["model_id"], counts["n_params"]))
            for m, e in todo:
                groups.setdefault((int(n_params[m]), e), []).append(m)
            for (_, epoch), ids in groups.items():
                index = self.handle.tensor_index(ids[0])
                for m, vector in zip(ids, self.handle.weights(ids, epoch=epoch, buffers=True)):
                    self._states[(m, epoch)] = unflatten(vector, index)
        return [self._states[k] for k in keys]

    def per_row(self, what: str, compute) -> list:
        """`compute(i, state)` for every row, each (model, epoch) computed once per `what`."""
        keys = list(zip(self.model_ids, self.epochs))
        states = self.states()
        for i, (key, state) in enumerate(zip(keys, states)):
            if (what, *key) not in self._memo:
                self._memo[(what, *key)] = compute(i, state)
        return [self._memo[(what, *key)] for key in keys]

    def kinds(self, i: int) -> dict[str, str]:
        """Tensor name -> "parameter" or "buffer" for row i's architecture."""
        return {e.name: e.kind for e in self.handle.tensor_index(self.model_ids[i])}

    def network(self, i: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Row i's network with `state` loaded, in eval mode."""
        from zoo.architectures import build_model

        spec = self.handle.spec(self.model_ids[i])
        model = build_model(spec.architecture, spec.input_shape, spec.n_classes)
        model.load_state_dict(state)
        return model.eval()


def statistics_of(inputs: ModelInputs) -> np.ndarray:
    return inputs.statistics


def on_statistics(*steps):
    """A pipeline that reads the rows' statistics, standardised, then runs `steps`."""
    return make_pipeline(FunctionTransformer(statistics_of), StandardScaler(), *steps)


# --------------------------------------------------------------------------- methods on statistics


class RidgeParameters(Parameters):
    alpha: float = Field(1.0, gt=0.0, description="ridge penalty (regression targets)")
    C: float = Field(1.0, gt=0.0, description="inverse penalty of the logistic regression (the phase)")


@register_method("linear", kind="prediction", parameters=RidgeParameters)
def linear(kind: str, p: RidgeParameters, seed: int):
    """Ridge regression / logistic regression on standardised statistics."""
    if kind == "regression":
        return on_statistics(Ridge(alpha=p.alpha))
    return on_statistics(LogisticRegression(C=p.C, max_iter=2000, random_state=seed))


@register_method("constant", kind="prediction")
def constant(kind: str, p: Parameters, seed: int):
    """The floor: the training mean (regression) or the most frequent phase."""
    from sklearn.dummy import DummyClassifier, DummyRegressor

    return on_statistics(DummyRegressor() if kind == "regression" else DummyClassifier(strategy="most_frequent"))


class GBTParameters(Parameters):
    max_iter: int = Field(300, ge=1, description="boosting rounds")
    learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    max_leaf_nodes: int = Field(15, ge=2)
    min_samples_leaf: int = Field(5, ge=1, description="small: a zoo holds hundreds of models, not millions of rows")


@register_method("gbt", kind="prediction", parameters=GBTParameters)
def gbt(kind: str, p: GBTParameters, seed: int):
    """Gradient-boosted trees on the statistics (Unterthiner et al. 2020)."""
    options = dict(max_iter=p.max_iter, learning_rate=p.learning_rate, max_leaf_nodes=p.max_leaf_nodes,
                   min_samples_leaf=p.min_samples_leaf, random_state=seed)
    if kind == "regression":
        return on_statistics(HistGradientBoostingRegressor(**options))
    return on_statistics(HistGradientBoostingClassifier(**options))


class StatNNParameters(Parameters):
    hidden: int = Field(64, ge=1, description="units in each of the two hidden layers")
    alpha: float = Field(1e-3, ge=0.0, description="L2 penalty")
    max_iter: int = Field(2000, ge=1)


@register_method("statnn", kind="prediction", parameters=StatNNParameters)
def statnn(kind: str, p: StatNNParameters, seed: int):
    """A small MLP (two hidden layers, Adam) on the standardised statistics; regression targets
    are standardised too."""
    options = dict(hidden_layer_sizes=(p.hidden, p.hidden), alpha=p.alpha, max_iter=p.max_iter, random_state=seed)
    if kind == "regression":
        return on_statistics(TransformedTargetRegressor(MLPRegressor(**options), transformer=StandardScaler()))
    return on_statistics(MLPClassifier(**options))


# --------------------------------------------------------------------------- the protocol


class PredictionSettings(Parameters):
    seed: int = Field(0, description="the split's seed (and the methods')")
    split: Literal["model", "cell"] = Field("model", description="hold out models, or whole cells of the grid")
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="the share of models (or cells) held out")
    epochs: list[int] | None = Field(None, min_length=1, description="the checkpoints used (default: the last)")


def split(props, how: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): the models (or cells) are shuffled with `seed` and the first
    `fraction` of them held out, with every row of a held-out model (or cell)."""
    keys = list(props["model_id"]) if how == "model" else list(zip(props["load"], props["temperature"]))
    distinct = list(dict.fromkeys(keys))
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_test = max(1, int(round(fraction * len(distinct))))
    held_out = {distinct[i] for i in order[:n_test]}
    test = np.array([i for i, k in enumerate(keys) if k in held_out], dtype=int)
    train = np.array([i for i, k in enumerate(keys) if k not in held_out], dtype=int)
    if len(distinct) - n_test < 2:
        raise ValueError(f"{len(distinct)} {how}s are too few to fit on a split by {how}")
    return train, test


@register_protocol("predict_properties", kind="prediction", unit="population", settings=PredictionSettings,
                   metrics={"r2_test_acc": "higher", "r2_gap": "higher", "r2_log_load": "higher",
                            "r2_log_temperature": "higher", "phase_accuracy": "higher", "r2_epoch": "higher",
                            "n_test": "higher"})
def predict_properties(unit, call, settings: PredictionSettings):
    """Fit on the training rows, score on the held-out ones: over all of them (phase "all")
    and within each phase."""
    import pandas as pd

    epochs = settings.epochs or [None]
    props = pd.concat([properties(unit.handle, unit.model_ids, e) for e in epochs], ignore_index=True)
    statistics = np.concatenate([weight_features(unit.handle, unit.model_ids, e) for e in epochs])
    inputs = ModelInputs(unit.handle, list(props["model_id"]), [int(e) for e in props["epoch"]], statistics)
    targets = {"test_acc": props["test_acc"].to_numpy(float), "gap": props["gap"].to_numpy(float),
               "log_load": np.log(props["load"].to_numpy(float)), "log_temperature": np.log(props["temperature"].to_numpy(float)),
               "epoch": props["epoch"].to_numpy(float)}
    if len(epochs) == 1:
        del targets["epoch"]
    phase = props["phase"].to_numpy(str)
    train, test = split(props, settings.split, settings.test_fraction, settings.seed)
    fit_on, score_on = inputs.take(train), inputs.take(test)
    predictions = {}
    for name, y in targets.items():
        estimator = call.method.function("regression", call.parameters, settings.seed)
        predictions[name] = np.asarray(estimator.fit(fit_on, y[train]).predict(score_on), float)
    if len(set(phase[train])) > 1:
        estimator = call.method.function("classification", call.parameters, settings.seed)
        phase_pred = np.asarray(estimator.fit(fit_on, phase[train]).predict(score_on)).astype(str)
    else:  # one phase in training: every prediction is that phase
        phase_pred = np.full(len(test), phase[train][0])
    rows = []
    groups = [("all", np.ones(len(test), bool))] + [(p, phase[test] == p) for p in sorted(set(phase[test]))]
    for label, mask in groups:
        for name in targets:
            value = r2_score(targets[name][test][mask], predictions[name][mask]) if mask.sum() >= 2 else float("nan")
            rows.append({"metric": f"r2_{name}", "value": value, "phase": label})
        rows.append({"metric": "phase_accuracy", "value": float(np.mean(phase_pred[mask] == phase[test][mask])), "phase": label})
        rows.append({"metric": "n_test", "value": int(mask.sum()), "phase": label})
    return rows
