"""`probing`: predict a model's properties from its outputs on fixed probe inputs, without
reading a weight.

Every model sees the same `n_probes` inputs, drawn once, when the head is fitted, from the
training inputs of the first training row's data set, with a generator seeded by the method's
seed: `probes: data` takes training inputs at random (their labels are never read),
`probes: gaussian` draws from a Gaussian with their per-feature mean and standard deviation.
ProbeX (2025) learns its probes; these are random, the simpler baseline of the probing family.

The model's outputs on the probes enter as class probabilities (softmax), not logits: a model's
accuracy is then close to a linear function of them (the probability it gives each probe's
usual class, which the head finds from the training models, never from a label). So the
default head is linear: ridge regression on the probabilities with its penalty
chosen by leave-one-out cross-validation (`RidgeCV`), or logistic regression for the phase.
`head: mlp` puts the `statnn` MLP there instead.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .prediction import ModelInputs
from .registry import Parameters, register_method


class ProbeOutputs(BaseEstimator, TransformerMixin):
    """ModelInputs -> (rows, n_probes x classes) class probabilities on the probes."""

    def __init__(self, n_probes: int = 64, probes: str = "data", seed: int = 0):
        self.n_probes, self.probes, self.seed = n_probes, probes, seed

    def fit(self, inputs: ModelInputs, y=None) -> ProbeOutputs:
        """Draw the probes, once, from the training inputs of the first row's data set (every
        row then sees the same inputs, also where the zoo's models saw different training sets,
        as teacher-student's do)."""
        source = inputs.handle.spec(inputs.model_ids[0]).dataset
        x = inputs.handle.data(inputs.model_ids[0]).x_train.float()
        generator = torch.Generator().manual_seed(self.seed)
        if self.probes == "data":
            self.probes_ = x[torch.randperm(len(x), generator=generator)[: self.n_probes]]
        else:
            noise = torch.randn((self.n_probes, *x.shape[1:]), generator=generator)
            self.probes_ = x.mean(0) + noise * x.std(0, correction=0)
        self.key_ = f"probing-{self.probes}-{self.n_probes}-{self.seed}-{json.dumps(source, sort_keys=True)}"
        return self

    def transform(self, inputs: ModelInputs) -> np.ndarray:
        def compute(i: int, state) -> np.ndarray:
            with torch.no_grad():
                return torch.softmax(inputs.network(i, state)(self.probes_).double(), 1).reshape(-1).numpy()

        return np.stack(inputs.per_row(self.key_, compute))


class ProbingParameters(Parameters):
    n_probes: int = Field(64, ge=1, description="probe inputs every model sees")
    probes: Literal["data", "gaussian"] = Field("data", description="training inputs, or Gaussian noise with their moments")
    head: Literal["linear", "mlp"] = Field("linear", description="ridge / logistic regression, or the statnn MLP")
    hidden: int = Field(64, ge=1, description="units in each of the MLP head's two hidden layers")
    alpha: float = Field(1e-3, ge=0.0, description="the MLP head's L2 penalty")
    max_iter: int = Field(2000, ge=1)


@register_method("probing", kind="prediction", parameters=ProbingParameters)
def probing(kind: str, p: ProbingParameters, seed: int):
    """A head on the model's class probabilities on probe inputs (no weights read)."""
    if p.head == "linear":
        head = (RidgeCV(alphas=np.logspace(-6, 3, 19)) if kind == "regression"
                else LogisticRegression(max_iter=3000, random_state=seed))
    else:
        options = dict(hidden_layer_sizes=(p.hidden, p.hidden), alpha=p.alpha, max_iter=p.max_iter, random_state=seed)
        head = (TransformedTargetRegressor(MLPRegressor(**options), transformer=StandardScaler()) if kind == "regression"
                else MLPClassifier(**options))
    # (no standardising: probabilities share one scale, and a probe every training model is sure
    # of has a near-zero spread, which scaling would turn into huge values for an unsure test model)
    return make_pipeline(ProbeOutputs(p.n_probes, p.probes, seed), head)
