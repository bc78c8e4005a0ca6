"""Property prediction from weights (the 2022 Model Zoos benchmark's protocol, plus the phase).

Features: per layer (every weight and bias tensor) the mean, variance and 1/25/50/75/99th
percentiles of its entries, the definitions of `metrics.weightspace.layer_statistics`, computed
for all models of one parameter count at once. Targets: test accuracy, generalisation gap, log load, log
temperature (R^2) and the cell's phase (accuracy), on a split by model. Predictors come from
scikit-learn (ridge and logistic regression on standardised features).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from zoo.population import properties

from .registry import Parameters, register_method, register_protocol

LEVELS = (0.01, 0.25, 0.5, 0.75, 0.99)
REGRESSION = ("test_acc", "gap", "log_load", "log_temperature")


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


class RidgeParameters(Parameters):
    alpha: float = Field(1.0, gt=0.0, description="ridge penalty (regression targets)")
    C: float = Field(1.0, gt=0.0, description="inverse penalty of the logistic regression (the phase)")


@register_method("linear", kind="prediction", parameters=RidgeParameters)
def linear(kind: str, p: RidgeParameters, seed: int):
    """Ridge regression / logistic regression on standardised statistics."""
    if kind == "regression":
        return make_pipeline(StandardScaler(), Ridge(alpha=p.alpha))
    return make_pipeline(StandardScaler(), LogisticRegression(C=p.C, max_iter=2000, random_state=seed))


@register_method("constant", kind="prediction")
def constant(kind: str, p: Parameters, seed: int):
    """The floor: the training mean (regression) or the most frequent phase."""
    from sklearn.dummy import DummyClassifier, DummyRegressor

    return DummyRegressor() if kind == "regression" else DummyClassifier(strategy="most_frequent")


class PredictionSettings(Parameters):
    seed: int = 0
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="models held out (a split by model)")
    epoch: int | None = Field(None, description="the checkpoint whose weights are used (default: the last)")


@register_protocol("predict_properties", kind="prediction", unit="population", settings=PredictionSettings,
                   metrics={"r2_test_acc": "higher", "r2_gap": "higher", "r2_log_load": "higher",
                            "r2_log_temperature": "higher", "phase_accuracy": "higher", "n_test": "higher"})
def predict_properties(unit, call, settings: PredictionSettings):
    """Fit on a random (seeded) split of the selected models, score on the held-out models:
    over all of them (phase "all") and within each phase."""
    x = weight_features(unit.handle, unit.model_ids, settings.epoch)
    props = properties(unit.handle, unit.model_ids, settings.epoch)
    targets = {"test_acc": props["test_acc"].to_numpy(float), "gap": props["gap"].to_numpy(float),
               "log_load": np.log(props["load"].to_numpy(float)), "log_temperature": np.log(props["temperature"].to_numpy(float))}
    phase = props["phase"].to_numpy(str)
    order = np.random.default_rng(settings.seed).permutation(len(x))
    n_test = max(1, int(round(settings.test_fraction * len(x))))
    test, train = order[:n_test], order[n_test:]
    if len(train) < 2:
        raise ValueError(f"{len(x)} models are too few to fit on a split by model")
    predictions = {}
    for name, y in targets.items():
        predictions[name] = call.method.function("regression", call.parameters, settings.seed).fit(x[train], y[train]).predict(x[test])
    if len(set(phase[train])) > 1:
        phase_pred = call.method.function("classification", call.parameters, settings.seed).fit(x[train], phase[train]).predict(x[test])
    else:  # one phase in training: every prediction is that phase
        phase_pred = np.full(len(test), phase[train][0])
    rows = []
    groups = [("all", np.ones(len(test), bool))] + [(p, phase[test] == p) for p in sorted(set(phase[test]))]
    for label, mask in groups:
        for name in REGRESSION:
            value = r2_score(targets[name][test][mask], predictions[name][mask]) if mask.sum() >= 2 else float("nan")
            rows.append({"metric": f"r2_{name}", "value": value, "phase": label})
        rows.append({"metric": "phase_accuracy", "value": float(np.mean(phase_pred[mask] == phase[test][mask])), "phase": label})
        rows.append({"metric": "n_test", "value": int(mask.sum()), "phase": label})
    return rows

