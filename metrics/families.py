"""The metric families `zoo metrics` computes, registered by name with their settings.

A family declares its settings (a pydantic model; a zoo overrides them in catalog.yaml under
`metrics: {FAMILY: {...}}`), whether it measures one model or a pair of seeds of the same cell,
and a compute function over stored models. The functions that do the measuring live in the
family modules (`hessian`, `spectral`, ...) and work on any torch module; this module only feeds
them a zoo's models and data with recorded settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError

from zoo.catalog import first_error
from zoo.errors import ZooError
from zoo.registry import Registry
from zoo.settings import Settings


@dataclass
class ModelContext:
    """One stored model at one epoch, loaded lazily, with its data and its cell partners."""

    handle: Any  # zoo.api.Root
    model_id: str
    epoch: int
    partners: list["ModelContext"] = field(default_factory=list)

    @cached_property
    def spec(self):
        return self.handle.spec(self.model_id)

    @cached_property
    def data(self):
        return self.handle.data(self.model_id)

    @cached_property
    def model(self) -> torch.nn.Module:
        return self.handle.load_model(self.model_id, self.epoch)

    @cached_property
    def curves(self) -> dict:
        """The curves row at this epoch (`cell_contexts` reads a whole cell's rows in one query)."""
        rows = self.handle.sql("select * from curves where model_id = ? and epoch = ?", [self.model_id, self.epoch])
        return rows.iloc[0].to_dict() if len(rows) else {}


    @cached_property
    def placed(self) -> torch.nn.Module:
        """The model on the device metrics run on (`zoo.device.run_device()`: $ZOO_DEVICE, else
        CUDA when present): the model itself on the CPU, else one copy there per context."""
        from zoo.device import run_device

        device = run_device()
        return self.model if device.type == "cpu" else copy.deepcopy(self.model).to(device)

    @cached_property
    def finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters())


def cell_contexts(handle, model_ids: list[str], epoch: int) -> list[ModelContext]:
    """Contexts for the models of one cell, each with the others as partners; configs and
    curves are read in one query each."""
    handle.specs(model_ids)
    rows = handle.sql("select * from curves where model_id in (select unnest(?)) and epoch = ?", [model_ids, epoch])
    by_id = {r["model_id"]: r for r in rows.to_dict("records")}
    contexts = [ModelContext(handle, model_id, epoch) for model_id in model_ids]
    for ctx in contexts:
        ctx.__dict__["curves"] = by_id.get(ctx.model_id, {})  # fills the cached property
        ctx.partners = [c for c in contexts if c is not ctx]
    return contexts


@dataclass
class Result:
    """What a model-level family measured: model metrics, per-layer metrics, optional density."""

    metrics: dict[str, float]
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    densities: list[tuple[str, float, float]] = field(default_factory=list)  # (split, eigenvalue, weight)


@dataclass(frozen=True)
class Family:
    name: str
    level: Literal["model", "pair"]
    settings: type[Settings]
    # model level: (contexts, settings) -> [Result]; pair level: (a, b, settings) -> {name: value}
    compute: Callable
    names: Callable[[Settings], list[str]]  # the model/pair metric names (NaN rows use them)

    def resolve(self, overrides: dict | None) -> Settings:
        try:
            return self.settings(**(overrides or {}))
        except ValidationError as e:
            field, message = first_error(e, f"metrics.{self.name}")
            raise ZooError(f"{field}: {message}") from None


FAMILIES: Registry[Family] = Registry("metric family")


def register_family(name: str, level: str, settings: type[Settings], names: Callable[[Settings], list[str]]):
    def wrap(compute):
        FAMILIES.add(name, Family(name, level, settings, compute, names), compute)
        return compute

    return wrap


def get_families(names: list[str] | None) -> list[Family]:
    if not names:
        return list(FAMILIES.values())
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ZooError(f"unknown metric family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    return [FAMILIES[n] for n in names]


def settings_hash(family: str, settings: Settings) -> str:
    blob = json.dumps({"family": family, **settings.model_dump()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def batches(x: torch.Tensor, y: torch.Tensor, n: int | None, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` samples (all when None or larger) in batches: the fixed, recorded sample."""
    n = len(x) if n is None else min(n, len(x))
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def n_samples(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(len(b[1]) for b in parts)


# --- performance ---------------------------------------------------------------------------


class PerformanceSettings(Settings):
    pass


@register_family("performance", "model", PerformanceSettings, lambda s: ["train_loss", "train_acc", "test_loss", "test_acc", "gap"])
def performance(contexts: list[ModelContext], settings: PerformanceSettings) -> list[Result]:
    """Train/test loss and accuracy at the epoch (from the stored curves), and the
    generalisation gap = train accuracy - test accuracy."""
    results = []
    for ctx in contexts:
        c = ctx.curves
        values = {k: float(c.get(k, np.nan)) for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
        values["gap"] = values["train_acc"] - values["test_acc"]
        results.append(Result(values))
    return results


# --- hessian -------------------------------------------------------------------------------


class HessianSettings(Settings):
    train_samples: int = Field(640, ge=1, description="first n training samples (the paper: 10 x 64)")
    test_samples: int = Field(640, ge=1)
    batch_size: int = Field(64, ge=1, description="pyhessian's mini-batches (the loss is the mean over all samples either way)")
    method: Literal["krylov", "lanczos", "pyhessian"] = Field(
        "krylov", description="krylov: top eigenvalues from a block Krylov space, the trace exact (see "
        "trace_exact_max_params) or from that space plus deflated Hutchinson probes; lanczos: Lanczos top "
        "eigenvalues, the trace exact or by Hutch++; pyhessian: power iteration + Hutchinson with relative-change "
        "stops (the published protocol)"
    )
    top_n: int = Field(1, ge=1)
    krylov_block: int = Field(8, ge=1, description="krylov: block size (vectors per batched product)")
    krylov_max_blocks: int = Field(20, ge=1, description="krylov: most blocks")
    eig_tol: float = Field(1e-3, ge=0, description="krylov: Ritz residual stop, relative to the eigenvalue")
    lanczos_iter: int = Field(30, ge=1, description="lanczos: Lanczos steps for the top eigenvalues")
    trace_exact_max_params: int = Field(
        1_000_000_000, ge=0, description="krylov, lanczos: the exact trace (metrics.hessian.exact_trace: C + 1 passes "
        "over the samples for C classes, far cheaper than probes) for models piecewise linear in each parameter with "
        "at most this many parameters; 0: never (the stochastic path, for comparison)")
    trace_sketch: int = Field(33, ge=1, description="lanczos: Hutch++ low-rank sketch size")
    trace_tol: float = Field(0.01, ge=0, description="krylov, lanczos: target relative standard error of a stochastic trace")
    trace_max_probes: int = Field(200, ge=2, description="krylov, lanczos: most Hutchinson probes after the sketch")
    max_iter: int = Field(100, ge=1, description="pyhessian: iterations (eigenvalues) and probes (trace)")
    tol: float = Field(1e-3, ge=0, description="pyhessian: relative-change stop")
    seed: int = Field(0, description="the family seed; each model, epoch, split and purpose draws from its own "
                      "stream derived from it (metrics.streams.stream_seed)")
    density: bool = True
    density_iter: int = Field(30, ge=1)
    density_probes: int = Field(1, ge=1)


def _hessian_names(s: HessianSettings) -> list[str]:
    names = []
    for split in ("train", "test"):
        for k in range(s.top_n):
            name = f"hessian_top_eig{'' if k == 0 else k + 1}"
            names += [f"{name}_{split}", f"{name}_stderr_{split}"]
        names += [f"hessian_trace_{split}", f"hessian_trace_stderr_{split}", f"hessian_trace_probes_{split}",
                  f"hessian_samples_{split}"]
    return names


@register_family("hessian", "model", HessianSettings, _hessian_names)
def hessian(contexts: list[ModelContext], s: HessianSettings) -> list[Result]:
    """Top eigenvalue(s) and trace of the loss Hessian on the first `train_samples` training and
    `test_samples` test samples (one block Krylov space, Lanczos, or pyhessian's power iteration for
    the eigenvalues; the trace exact for small piecewise-linear models, else deflated Hutchinson,
    Hutch++ or pyhessian's Hutchinson), each with its error bar (`*_stderr_*`: for an eigenvalue the
    Ritz residual ||Hx - theta x||, which bounds its distance to an eigenvalue of H; for a trace the
    probes' standard error, 0 when exact), and the SLQ eigenvalue density on the training sample.
    Every random draw comes from a stream of its own (model id, epoch, split, purpose: see
    metrics.streams), so errors are independent across models and reruns are bit-identical."""
    from .hessian import (exact_trace, hessian_density, hessian_top_eigenvalues, hessian_trace, hutchpp_trace,
                          krylov_top_eigenvalues_and_trace, lanczos_top_eigenvalues,
                          piecewise_linear_in_each_parameter)
    from .streams import stream_seed

    results = []
    for ctx in contexts:
        values, densities = {}, []
        # our Hessian-vector products run on the metrics device (the Krylov algebra stays on the
        # CPU); pyhessian, the published protocol, runs on the CPU as published
        model = ctx.model if s.method == "pyhessian" else ctx.placed
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        exact = (s.method != "pyhessian" and n_params <= s.trace_exact_max_params
                 and piecewise_linear_in_each_parameter(model))
        for split, x, y, n in (
            ("train", ctx.data.x_train, ctx.data.y_train, s.train_samples),
            ("test", ctx.data.x_test, ctx.data.y_test, s.test_samples),
        ):
            def seed(purpose: str) -> int:
                return stream_seed(s.seed, f"hessian/{purpose}/{split}", ctx.model_id, ctx.epoch)

            sample = batches(x, y, n, s.batch_size)
            whole = batches(x, y, n, n)  # the same loss in one pass: our products need no mini-batches
            if s.method == "krylov":  # one result carries both: .eigenvalues, .trace, .n_probes
                top = trace = krylov_top_eigenvalues_and_trace(
                    model, whole, top_n=s.top_n, block=s.krylov_block, eig_tol=s.eig_tol,
                    max_blocks=s.krylov_max_blocks, trace_tol=s.trace_tol, max_probes=s.trace_max_probes,
                    seed=seed("krylov"), trace=not exact)
            elif s.method == "lanczos":
                top = lanczos_top_eigenvalues(model, whole, top_n=s.top_n, n_iter=s.lanczos_iter, seed=seed("lanczos"))
                trace = None if exact else hutchpp_trace(model, whole, sketch=s.trace_sketch, tol=s.trace_tol,
                                                         max_probes=s.trace_max_probes, seed=seed("hutchpp"))
            else:
                top = hessian_top_eigenvalues(model, sample, top_n=s.top_n, max_iter=s.max_iter, tol=s.tol,
                                              seed=seed("power"))
                trace = hessian_trace(model, sample, max_iter=s.max_iter, tol=s.tol, seed=seed("hutchinson"))
            if exact:
                trace = exact_trace(model, whole)
            for k, (value, residual) in enumerate(zip(top.eigenvalues, top.residuals)):
                name = f"hessian_top_eig{'' if k == 0 else k + 1}"
                values[f"{name}_{split}"] = float(value)
                values[f"{name}_stderr_{split}"] = float(residual)
            values[f"hessian_trace_{split}"] = float(trace.trace)
            values[f"hessian_trace_stderr_{split}"] = float(trace.stderr)
            values[f"hessian_trace_probes_{split}"] = float(trace.n_probes)
            values[f"hessian_samples_{split}"] = float(n_samples(sample))
            if s.density and split == "train":
                d = hessian_density(model, whole, n_iter=s.density_iter, n_v=s.density_probes, seed=seed("density"))
                densities = [("train", float(e), float(w)) for e, w in zip(d.eigenvalues, d.weights)]
        results.append(Result(values, densities=densities))
    return results


# --- spectral ------------------------------------------------------------------------------

SPECTRAL_LAYER = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank", "entropy", "farms_alpha")


class SpectralSettings(Settings):
    farms_window: tuple[int, int] = (100, 200)
    farms_positions: int = Field(10, ge=1)
    min_eigenvalues: int = Field(20, ge=2, description="layers with fewer eigenvalues are left out of the model means")


@register_family("spectral", "model", SpectralSettings, lambda s: [f"{n}_mean" for n in SPECTRAL_LAYER] + ["n_layers_fitted"])
def spectral(contexts: list[ModelContext], s: SpectralSettings) -> list[Result]:
    """Per layer: the ESD metrics of W^T W and FARMS alpha; per model: their means over the
    layers with at least `min_eigenvalues` eigenvalues (power-law fits on fewer are unreliable;
    every layer's count is stored as `n_eigs`). The SVDs of same-shape layers of all models of
    the cell are batched."""
    from .spectral import spectral_metrics_many

    per_model = spectral_metrics_many([c.placed for c in contexts], s.farms_window, s.farms_positions)
    results = []
    for layers in per_model:
        fitted = [m for m in layers.values() if m["n_eigs"] >= s.min_eigenvalues]
        means = {f"{n}_mean": float(np.mean([m[n] for m in fitted])) if fitted else np.nan for n in SPECTRAL_LAYER}
        means["n_layers_fitted"] = float(len(fitted))
        results.append(Result(means, layers={name: {k: float(v) for k, v in m.items()} for name, m in layers.items()}))
    return results


# --- weight space --------------------------------------------------------------------------


class WeightSpaceSettings(Settings):
    pass


@register_family(
    "weightspace", "model", WeightSpaceSettings,
    lambda s: ["l2_norm", "dist_init_l2", "dist_init_rel", "dist_partners_l2_mean", "n_partners"],
)
def weightspace(contexts: list[ModelContext], s: WeightSpaceSettings) -> list[Result]:
    """Whole-model L2 norm, distance from the model's own initialisation (epoch 0) and mean
    distance to its seed partners in the cell at the same epoch; per-layer statistics."""
    from .weightspace import weight_statistics

    results = []
    for ctx in contexts:
        init = ctx.handle.load_model(ctx.model_id, 0)
        model_metrics, layer_metrics = weight_statistics(ctx.model, init, [p.model for p in ctx.partners])
        model_metrics.pop("n_params", None)
        results.append(Result({k: float(v) for k, v in model_metrics.items()}, layers=layer_metrics))
    return results


# --- pairs: CKA and mode connectivity ------------------------------------------------------


class CKASettings(Settings):
    samples: int = Field(1280, ge=2, description="first n test samples (the paper: 10 x 128)")
    batch_size: int = Field(1024, ge=1)


@register_family("cka", "pair", CKASettings, lambda s: ["cka_logits", "cka_penultimate", "cka_samples"])
def cka(a: ModelContext, b: ModelContext, s: CKASettings) -> dict[str, float]:
    """Linear CKA between two seeds' logits and penultimate representations on test samples."""
    from .cka import cka_between

    x = a.data.x_test[: s.samples]
    return {**cka_between(a.placed, b.placed, x, batch_size=s.batch_size), "cka_samples": float(len(x))}


class ConnectivitySettings(Settings):
    n_points: int = Field(5, ge=3)
    bezier: bool = True
    bezier_epochs: int = Field(10, ge=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    train_samples: int | None = Field(None, ge=1, description="first n training samples (default all)")
    test_samples: int | None = Field(None, ge=1)
    seed: int = 0


def _connectivity_names(s: ConnectivitySettings) -> list[str]:
    paths = ("linear", "bezier") if s.bezier else ("linear",)
    return [f"{kind}_{p}_{split}_{q}" for kind in ("mc", "barrier") for p in paths for split in ("train", "test") for q in ("loss", "error")]


@register_family("connectivity", "pair", ConnectivitySettings, _connectivity_names)
def connectivity(a: ModelContext, b: ModelContext, s: ConnectivitySettings) -> dict[str, float]:
    """Mode connectivity mc (and barrier height) along the linear path and the trained quadratic
    Bezier curve, on train/test loss and error, BatchNorm re-estimated at every point."""
    from .connectivity import connectivity_metrics
    from .streams import stream_seed

    device = next(a.placed.parameters()).device  # (the batches go there once, not per path point)
    train = [(x.to(device), y.to(device)) for x, y in batches(a.data.x_train, a.data.y_train, s.train_samples, s.batch_size)]
    test = [(x.to(device), y.to(device)) for x, y in batches(a.data.x_test, a.data.y_test, s.test_samples, s.batch_size)]
    # the Bezier curve's t draws come from the pair's own stream (metrics.streams)
    pair_seed = stream_seed(s.seed, "connectivity/bezier", a.model_id, b.model_id, a.epoch)
    values = connectivity_metrics(
        a.placed, b.placed, train, test, n_points=s.n_points, bezier=s.bezier, bezier_epochs=s.bezier_epochs,
        seed=pair_seed, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
    )
    wanted = set(_connectivity_names(s))
    return {k: float(v) for k, v in values.items() if k in wanted}
