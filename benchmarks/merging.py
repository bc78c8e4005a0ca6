"""Merging: soups, interpolation, weight matching, task arithmetic, TIES and DARE, and the
protocols that score them on a zoo.

The merge functions work on plain state dicts and need no zoo:

    uniform_soup(states)                          Wortsman et al. 2022, "Model soups"
    greedy_soup(states, score)                    ... the greedy recipe
    interpolate(a, b, alpha)                      (1 - alpha) a + alpha b (WiSE-FT's form)
    weight_matching(reference, other, spec)       Ainsworth et al. 2023, "Git Re-Basin"
    task_arithmetic(base, finetuned, lam)         Ilharco et al. 2023
    ties(base, finetuned, keep, lam)              Yadav et al. 2023 (trimmed over the whole model)
    dare(delta, p, generator)                     Yu et al. 2024

Integer buffers (BatchNorm's num_batches_tracked) are never averaged: the first model's are kept.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from zoo.permutations import PermutationSpec, permutation_spec, permute_state

from .evaluation import StateDict, accuracy, finetune, has_batchnorm, reestimate_batchnorm, with_state
from .contracts import MergeContext
from .registry import Parameters, register_method, register_protocol

# --------------------------------------------------------------------------- merge functions


def _floating(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def uniform_soup(states: list[StateDict]) -> StateDict:
    """The mean of every floating-point tensor."""
    if not states:
        raise ValueError("a soup needs at least one model")
    out = dict(states[0])
    for key in _floating(states[0]):
        out[key] = torch.stack([s[key] for s in states]).mean(0)
    return out


def greedy_soup(states: list[StateDict], score: Callable[[StateDict], float]) -> tuple[StateDict, list[int]]:
    """Greedy soup: ingredients sorted by `score` (held-out accuracy), best first; the soup starts
    as the best one, and each next one is kept only if the running mean with it scores strictly
    higher than the best so far. Returns the soup and the indices of its ingredients."""
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    chosen, soup, best = [order[0]], states[order[0]], scores[order[0]]
    for i in order[1:]:
        n = len(chosen)
        candidate = dict(soup)
        for key in _floating(soup):
            candidate[key] = soup[key] * (n / (n + 1)) + states[i][key] / (n + 1)
        value = score(candidate)
        if value > best:
            soup, best = candidate, value
            chosen.append(i)
    return soup, chosen


def interpolate(a: StateDict, b: StateDict, alpha: float) -> StateDict:
    out = dict(a)
    for key in _floating(a):
        out[key] = (1 - alpha) * a[key] + alpha * b[key]
    return out


def weight_matching(reference: StateDict, other: StateDict, spec: PermutationSpec, max_passes: int = 100,
                    seed: int = 0) -> list[torch.Tensor]:
    """Permutations of `other`'s hidden units that maximise sum <W_ref, P W_other> over every
    tensor they touch (coordinate ascent: one layer at a time, in random order, each solved
    exactly by scipy's linear_sum_assignment), until a pass improves nothing (> 1e-12) or
    `max_passes`. Apply them with `zoo.permutations.permute_state(other, spec, perms)`."""
    perms = [torch.arange(g.size) for g in spec]
    rng = random.Random(seed)
    for _ in range(max_passes):
        improved = False
        for k in rng.sample(range(len(spec)), len(spec)):
            rest = [p if j != k else torch.arange(spec[k].size) for j, p in enumerate(perms)]
            moved = permute_state(other, spec, rest)
            cost = torch.zeros(spec[k].size, spec[k].size, dtype=torch.float64)
            for a in spec[k].axes:
                ref = _units_first(reference[a.name], a.axis, a.block, spec[k].size)
                oth = _units_first(moved[a.name], a.axis, a.block, spec[k].size)
                cost += ref @ oth.T
            _, columns = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(columns)
            old_value = cost[torch.arange(len(new)), perms[k]].sum()
            new_value = cost[torch.arange(len(new)), new].sum()
            if new_value > old_value + 1e-12:
                perms[k], improved = new, True
        if not improved:
            break
    return perms


def _units_first(tensor: torch.Tensor, axis: int, block: int, size: int) -> torch.Tensor:
    """(units, everything else) float64: the axis's units first, blocks kept with their unit."""
    t = tensor.detach().double().movedim(axis, 0)
    return t.reshape(size, -1)


def task_vectors(base: StateDict, finetuned: list[StateDict]) -> list[StateDict]:
    return [{k: s[k] - base[k] for k in _floating(base)} for s in finetuned]


def task_arithmetic(base: StateDict, finetuned: list[StateDict], lam: float) -> StateDict:
    """theta = theta_base + lam * sum of task vectors."""
    out = dict(base)
    for tau in task_vectors(base, finetuned):
        for key, delta in tau.items():
            out[key] = out[key] + lam * delta
    return out


def ties_vector(taus: list[StateDict], keep: float) -> StateDict:
    """TIES' merged task vector: trim each vector to its top `keep` fraction of magnitudes over
    the whole model (the paper's choice; mergekit trims per tensor), elect a sign per entry
    (the sign of the sum of the trimmed values; zero -> the sign of the untrimmed sum), and
    average the trimmed entries that agree with it (0 where none does)."""
    keys = list(taus[0])
    flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus])  # (tasks, P)
    n_keep = max(1, int(math.ceil(keep * flat.shape[1]))) if keep > 0 else 0
    trimmed = torch.zeros_like(flat)
    if n_keep:
        top = flat.abs().topk(n_keep, dim=1).indices
        trimmed.scatter_(1, top, flat.gather(1, top))
    sign = torch.sign(trimmed.sum(0))
    sign = torch.where(sign == 0, torch.sign(flat.sum(0)), sign)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    merged = torch.where(count > 0, (trimmed * agree).sum(0) / count.clamp(min=1), torch.zeros_like(sign))
    out, offset = {}, 0
    for k in keys:
        n = taus[0][k].numel()
        out[k] = merged[offset : offset + n].reshape(taus[0][k].shape)
        offset += n
    return out


def ties(base: StateDict, finetuned: list[StateDict], keep: float, lam: float) -> StateDict:
    out = dict(base)
    for key, delta in ties_vector(task_vectors(base, finetuned), keep).items():
        out[key] = out[key] + lam * delta
    return out


def dare(delta: StateDict, p: float, generator: torch.Generator) -> StateDict:
    """Drop each entry with probability p, rescale the survivors by 1 / (1 - p)."""
    if not 0 <= p < 1:
        raise ValueError(f"DARE's drop probability must be in [0, 1), got {p}")
    out = {}
    for key, value in delta.items():
        mask = torch.rand(value.shape, generator=generator) >= p
        out[key] = value * mask / (1 - p)
    return out


# --------------------------------------------------------------------------- methods


class NoParameters(Parameters):
    pass


@register_method("uniform_soup", kind="merging")
def _uniform_soup(states, p, ctx: MergeContext):
    """The mean of the inputs' weights."""
    return uniform_soup(states)


@register_method("greedy_soup", kind="merging")
def _greedy_soup(states, p, ctx: MergeContext):
    """Greedy soup, selected on the validation half."""
    return greedy_soup(states, ctx.val_accuracy)[0]


class InterpolationParameters(Parameters):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the second input")


@register_method("interpolation", kind="merging", parameters=InterpolationParameters)
def _interpolation(states, p: InterpolationParameters, ctx: MergeContext):
    """(1 - alpha) * first + alpha * second input."""
    if len(states) < 2:
        raise ValueError("interpolation needs two inputs")
    return interpolate(states[0], states[1], p.alpha)


class MatchingParameters(Parameters):
    max_passes: int = Field(100, ge=1)


@register_method("weight_matching_soup", kind="merging", parameters=MatchingParameters)
def _weight_matching_soup(states, p: MatchingParameters, ctx: MergeContext):
    """Align every input to the first by weight matching, then average."""
    spec = permutation_spec(ctx.template)
    aligned = [states[0]] + [permute_state(s, spec, weight_matching(states[0], s, spec, p.max_passes, ctx.seed)) for s in states[1:]]
    return uniform_soup(aligned)


class TaskArithmeticParameters(Parameters):
    lam: float = Field(1.0, gt=0.0, description="scale of the summed task vectors")


def _need_base(ctx: MergeContext):
    if ctx.base is None:
        raise ValueError("this method merges task vectors: it needs the merge_tasks protocol (a base model)")
    return ctx.base


@register_method("task_arithmetic", kind="merging", parameters=TaskArithmeticParameters)
def _task_arithmetic(states, p: TaskArithmeticParameters, ctx: MergeContext):
    """base + lam * sum of task vectors."""
    return task_arithmetic(_need_base(ctx), states, p.lam)


class TiesParameters(Parameters):
    keep: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept (whole model)")
    lam: float = Field(1.0, gt=0.0)


@register_method("ties", kind="merging", parameters=TiesParameters)
def _ties(states, p: TiesParameters, ctx: MergeContext):
    """TIES: trim, elect sign, disjoint mean."""
    return ties(_need_base(ctx), states, p.keep, p.lam)


class DareParameters(Parameters):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability")
    lam: float = Field(1.0, gt=0.0)
    then: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    keep: float = Field(0.2, gt=0.0, le=1.0, description="TIES' keep fraction when then=ties")


@register_method("dare", kind="merging", parameters=DareParameters)
def _dare(states, p: DareParameters, ctx: MergeContext):
    """DARE on each task vector, then task arithmetic (or TIES)."""
    base = _need_base(ctx)
    generator = torch.Generator().manual_seed(ctx.seed)
    sparse = [dare(tau, p.p, generator) for tau in task_vectors(base, states)]
    rebuilt = [{k: base[k] + tau[k] if k in tau else base[k] for k in base} for tau in sparse]
    return task_arithmetic(base, rebuilt, p.lam) if p.then == "task_arithmetic" else ties(base, rebuilt, p.keep, p.lam)


# --------------------------------------------------------------------------- protocols

MERGE_METRICS = {"test_acc": "higher", "test_acc_bn": "higher", "val_acc": "higher", "best_ingredient_acc": "higher",
                 "mean_ingredient_acc": "higher", "gain_over_best": "higher", "n_inputs": "higher"}


class MergeSettings(Parameters):
    seed: int = 0
    last_k: int = Field(5, ge=2, description="merge_checkpoints: the last k stored checkpoints")
    bn_samples: int = Field(2048, ge=1, description="training samples for BatchNorm re-estimation")


def _score_merge(unit, call, settings: MergeSettings, states: list[StateDict], template, base=None) -> dict[str, float]:
    split = unit.holdout()
    val = lambda s: accuracy(with_state(template, s), split.x_val, split.y_val)  # noqa: E731
    ingredients = [accuracy(with_state(template, s), split.x_test, split.y_test) for s in states]
    merged_state = call.method.function(states, call.parameters, MergeContext(template, val, base, settings.seed))
    merged = with_state(template, merged_state)
    test_acc = accuracy(merged, split.x_test, split.y_test)
    if has_batchnorm(merged):
        test_acc_bn = accuracy(reestimate_batchnorm(merged, split.x_train[: settings.bn_samples]), split.x_test, split.y_test)
    else:
        test_acc_bn = test_acc  # nothing to re-estimate
    best = max(ingredients)
    return dict(test_acc=test_acc, test_acc_bn=test_acc_bn, val_acc=val(merged_state), best_ingredient_acc=best,
                mean_ingredient_acc=float(np.mean(ingredients)), gain_over_best=max(test_acc, test_acc_bn) - best,
                n_inputs=len(states))


@register_protocol("merge_seeds", kind="merging", unit="cell", metrics=MERGE_METRICS, settings=MergeSettings)
def merge_seeds(unit, call, settings: MergeSettings):
    """Merge the final weights of the seeds of a cell (in seed order)."""
    models = [unit.handle.load_model(m) for m in unit.model_ids]
    return _score_merge(unit, call, settings, [m.state_dict() for m in models], models[0])


@register_protocol("merge_checkpoints", kind="merging", unit="model", metrics=MERGE_METRICS, settings=MergeSettings)
def merge_checkpoints(unit, call, settings: MergeSettings):
    """Merge a model's last `last_k` stored checkpoints (epoch averaging), latest first."""
    model_id = unit.model_ids[0]
    epochs = sorted(unit.handle.sql("select distinct epoch from checkpoints where model_id = ?", [model_id])["epoch"])[-settings.last_k :]
    if len(epochs) < 2:
        raise ValueError(f"model {model_id} has {len(epochs)} checkpoint(s); epoch averaging needs two")
    models = [unit.handle.load_model(model_id, int(e)) for e in reversed(epochs)]
    return _score_merge(unit, call, settings, [m.state_dict() for m in models], models[0])


TASK_METRICS = {"test_acc": "higher", "test_acc_bn": "higher", "task_a_acc": "higher", "task_b_acc": "higher",
                "finetuned_a_acc": "higher", "finetuned_b_acc": "higher", "base_acc": "higher", "lam": "higher"}


class TaskMergeSettings(Parameters):
    seed: int = 0
    epochs: int = Field(3, ge=1, description="fine-tuning epochs per task")
    lr: float = Field(0.01, gt=0.0)
    batch_size: int = Field(32, ge=1)
    split_classes: int | None = Field(None, ge=1, description="task a: classes below this (default: half)")
    lambdas: list[float] = Field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0], min_length=1,
                                 description="scales swept on the validation half (replaces the method's lam)")


@register_protocol("merge_tasks", kind="merging", unit="cell", metrics=TASK_METRICS, settings=TaskMergeSettings)
def merge_tasks(unit, call, settings: TaskMergeSettings):
    """Task vectors from fine-tuning the cell's first seed on two label sets (task a: the lower
    classes, task b: the rest), merged by the method; lam swept on the validation half; scored on
    the test half (all classes), and per task."""
    base_model = unit.handle.load_model(unit.model_ids[0])
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    split = unit.holdout()
    n_classes = int(split.y_train.max()) + 1
    cut = settings.split_classes or n_classes // 2
    in_a_train, in_a_test = split.y_train < cut, split.y_test < cut
    finetuned = []
    for k, mask in enumerate((in_a_train, ~in_a_train)):
        model = with_state(base_model, base)
        finetune(model, split.x_train[mask], split.y_train[mask], settings.epochs, settings.lr, settings.batch_size,
                 settings.seed + k)
        finetuned.append({k2: v.detach().clone() for k2, v in model.state_dict().items()})
    val = lambda s: accuracy(with_state(base_model, s), split.x_val, split.y_val)  # noqa: E731
    best_state, best_val, best_lam = None, -1.0, math.nan
    for lam in settings.lambdas:
        parameters = call.parameters.model_copy(update={"lam": lam}) if "lam" in type(call.parameters).model_fields else call.parameters
        state = call.method.function(finetuned, parameters, MergeContext(base_model, val, base, settings.seed))
        value = val(state)
        if value > best_val:
            best_state, best_val, best_lam = state, value, lam
    merged = with_state(base_model, best_state)
    test = lambda m, mask: accuracy(m, split.x_test[mask], split.y_test[mask])  # noqa: E731
    everything = torch.ones(len(split.y_test), dtype=torch.bool)
    test_acc = test(merged, everything)
    test_acc_bn = test(reestimate_batchnorm(merged, split.x_train[:2048]), everything) if has_batchnorm(merged) else test_acc
    fa, fb = (with_state(base_model, s) for s in finetuned)
    return dict(test_acc=test_acc, test_acc_bn=test_acc_bn, task_a_acc=test(merged, in_a_test), task_b_acc=test(merged, ~in_a_test),
                finetuned_a_acc=test(fa, everything), finetuned_b_acc=test(fb, everything),
                base_acc=test(base_model, everything), lam=best_lam)

