"""Weight generation: new models sampled from a population's weights, scored by their accuracy
and their novelty.

Generators see the population as an (N, P) matrix of flat weights, first aligned to one
reference model by weight matching (independent seeds are permuted copies of each other's
solutions at best, so per-parameter statistics of unaligned weights mean little).

    copies             rows of the population (the floor any generator must beat on novelty)
    noise_copies       copies plus Gaussian noise, sigma a fraction of each tensor's std
    gaussian           an independent Gaussian per parameter, fitted to the aligned weights
    random_init        freshly initialised models (the other floor)
    autoencoder        a hyper-representation (Schuerholt et al. 2022): an MLP autoencoder over
                       standardised weights; latents sampled from a Gaussian KDE of the
                       population's latents (scipy), then decoded

Novelty (p-diff, Wang et al. 2024): for a generated model, the largest IoU between its set of
misclassified test examples and that of any population model; 1 = behaves as a copy.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from scipy.stats import gaussian_kde
from torch import nn

from zoo.architectures import build_model
from zoo.permutations import permutation_spec, permute_state
from zoo.weights import unflatten

from .contracts import GenerationContext
from .evaluation import with_state
from .merging import weight_matching
from .registry import Parameters, register_method, register_protocol


@register_method("copies", kind="generation")
def copies(weights: torch.Tensor, p, ctx: GenerationContext) -> torch.Tensor:
    """Population models drawn uniformly, unchanged."""
    return weights[torch.randint(len(weights), (ctx.n,), generator=ctx.generator)]


class NoiseParameters(Parameters):
    sigma: float = Field(0.05, gt=0.0, description="noise std as a fraction of each tensor's std")


@register_method("noise_copies", kind="generation", parameters=NoiseParameters)
def noise_copies(weights: torch.Tensor, p: NoiseParameters, ctx: GenerationContext) -> torch.Tensor:
    """Copies plus per-tensor Gaussian noise."""
    out = copies(weights, p, ctx).clone()
    for e in (e for e in ctx.index if e.kind == "parameter"):
        block = out[:, e.offset : e.offset + e.numel]
        scale = block.std(dim=1, keepdim=True) * p.sigma
        block += torch.randn(block.shape, generator=ctx.generator) * scale
    return out


@register_method("gaussian", kind="generation")
def gaussian(weights: torch.Tensor, p, ctx: GenerationContext) -> torch.Tensor:
    """An independent Gaussian per (aligned) parameter."""
    mean, std = weights.mean(0), weights.std(0, correction=1 if len(weights) > 1 else 0)
    return mean + std * torch.randn((ctx.n, weights.shape[1]), generator=ctx.generator)


@register_method("random_init", kind="generation")
def random_init(weights: torch.Tensor, p, ctx: GenerationContext) -> torch.Tensor:
    """Freshly initialised models (the architecture's own initialisation)."""
    rows = []
    for k in range(ctx.n):
        s = ctx.model_spec
        model = build_model(s.architecture, s.input_shape, s.n_classes, seed=10_000 + ctx.seed * 1000 + k)
        rows.append(torch.cat([model.state_dict()[e.name].reshape(-1).float() for e in ctx.index if e.kind == "parameter"]))
    return torch.stack(rows)


# The flat autoencoder's outer layers hold parameters x hidden weights; past this many (0.5 GB
# each in float32, about 4 GB with gradients and Adam's moments) it is refused, not run out of memory.
AUTOENCODER_MAX_WEIGHTS = 1 << 27


class AutoencoderParameters(Parameters):
    latent: int = Field(16, ge=1)
    hidden: int = Field(256, ge=1)
    steps: int = Field(1500, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    noise: float = Field(0.05, ge=0.0, description="input noise during training (in standardised units)")
    bandwidth: float | None = Field(None, gt=0.0, description="KDE bandwidth factor (default: Scott's rule)")


@register_method("autoencoder", kind="generation", parameters=AutoencoderParameters)
def autoencoder(weights: torch.Tensor, p: AutoencoderParameters, ctx: GenerationContext) -> torch.Tensor:
    """Hyper-representation: MLP autoencoder + KDE over latents."""
    if len(weights) <= p.latent:  # a KDE needs more points than dimensions: say so before training
        raise ValueError(f"{len(weights)} models are too few for a {p.latent}-dimensional latent KDE")
    if weights.shape[1] * p.hidden > AUTOENCODER_MAX_WEIGHTS:
        raise ValueError(f"an autoencoder over {weights.shape[1]:,} parameters with {p.hidden} hidden units has "
                         f"{weights.shape[1] * p.hidden:,} weights per outer layer, over {AUTOENCODER_MAX_WEIGHTS:,} "
                         "(a flat MLP autoencoder does not scale to this architecture)")
    mean, std = weights.mean(0), weights.std(0).clamp(min=1e-8)
    z = (weights - mean) / std
    torch.manual_seed(ctx.seed)
    size = weights.shape[1]
    encoder = nn.Sequential(nn.Linear(size, p.hidden), nn.GELU(), nn.Linear(p.hidden, p.latent))
    decoder = nn.Sequential(nn.Linear(p.latent, p.hidden), nn.GELU(), nn.Linear(p.hidden, size))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=p.lr)
    for _ in range(p.steps):
        noisy = z + p.noise * torch.randn(z.shape, generator=ctx.generator)
        loss = nn.functional.mse_loss(decoder(encoder(noisy)), z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        latents = encoder(z).double().numpy()
        kde = gaussian_kde(latents.T, bw_method=p.bandwidth)
        sampled = kde.resample(ctx.n, seed=np.random.default_rng(ctx.seed)).T
        return decoder(torch.as_tensor(sampled, dtype=torch.float32)) * std + mean


# --------------------------------------------------------------------------- protocol


class GenerationSettings(Parameters):
    seed: int = 0
    samples: int = Field(20, ge=1, description="models generated per population")
    align: bool = Field(True, description="weight-match every model to the first before fitting")
    min_models: int = Field(8, ge=2, description="phases with fewer models are not fitted on their own")


# novelty_iou: the largest IoU of misclassified test sets with a population model (lower: more novel)
GENERATION_METRICS = {"gen_acc_mean": "higher", "gen_acc_median": "higher", "gen_acc_max": "higher",
                      "zoo_acc_mean": "higher", "novelty_iou": "lower", "n_models": "higher"}


@register_protocol("generate_weights", kind="generation", unit="population", metrics=GENERATION_METRICS,
                   settings=GenerationSettings)
def generate_weights(unit, call, settings: GenerationSettings):
    """Fit the generator on the selected models (one architecture) and on each phase's models
    alone (phases with at least `min_models`); score the generated models on the test half."""
    z = unit.handle
    counts = z.sql("select count(distinct n_params) as n from models where model_id in (select unnest(?))", [unit.model_ids])
    if int(counts["n"].iloc[0]) > 1:
        raise ValueError("weight generation needs models of one architecture and width: narrow the task's select")
    template = z.load_model(unit.model_ids[0])
    index = z.tensor_index(unit.model_ids[0])
    n_params = sum(e.numel for e in index if e.kind == "parameter")
    weights = z.weights(unit.model_ids)[:, :n_params]
    spec = permutation_spec(template)
    if settings.align:
        weights = torch.stack([weights[0]] + [_aligned(weights[0], w, index, spec, settings.seed) for w in weights[1:]])
    split = unit.holdout()
    wrong = torch.stack([_misclassified(_model(template, index, w), split) for w in weights])
    phases = unit.models["phase"].to_numpy(str)
    rows = []
    groups = [("all", np.ones(len(phases), bool))]
    groups += [(p, phases == p) for p in sorted(set(phases)) if (phases == p).sum() >= settings.min_models and p != "unlabelled"]
    for label, mask in groups:
        members = torch.as_tensor(np.flatnonzero(mask))
        ctx = GenerationContext(z.spec(unit.model_ids[0]), index, settings.samples, torch.Generator().manual_seed(settings.seed), settings.seed)
        generated = call.method.function(weights[members], call.parameters, ctx)
        accuracies, novelty = [], []
        for w in generated:
            missed = _misclassified(_model(template, index, w), split)
            accuracies.append(1 - missed.float().mean().item())
            novelty.append(_max_iou(missed, wrong[members]))
        zoo_acc = 1 - wrong[members].float().mean(1)
        rows += [dict(metric="gen_acc_mean", value=float(np.mean(accuracies)), phase=label),
                 dict(metric="gen_acc_median", value=float(np.median(accuracies)), phase=label),
                 dict(metric="gen_acc_max", value=float(np.max(accuracies)), phase=label),
                 dict(metric="zoo_acc_mean", value=float(zoo_acc.mean()), phase=label),
                 dict(metric="novelty_iou", value=float(np.mean(novelty)), phase=label),
                 dict(metric="n_models", value=int(mask.sum()), phase=label)]
    return rows


def _model(template: nn.Module, index, flat: torch.Tensor) -> nn.Module:
    state = dict(template.state_dict())
    state.update(unflatten(flat.detach(), [e for e in index if e.kind == "parameter"]))
    return with_state(template, state)


def _aligned(reference: torch.Tensor, other: torch.Tensor, index, spec, seed: int) -> torch.Tensor:
    entries = [e for e in index if e.kind == "parameter"]
    ref, oth = unflatten(reference, entries), unflatten(other, entries)
    state_spec = [type(g)(g.size, tuple(a for a in g.axes if a.name in ref)) for g in spec]
    moved = permute_state(oth, state_spec, weight_matching(ref, oth, state_spec, seed=seed))
    return torch.cat([moved[e.name].reshape(-1) for e in entries])


@torch.no_grad()
def _misclassified(model: nn.Module, split) -> torch.Tensor:
    return model(split.x_test).argmax(1) != split.y_test


def _max_iou(missed: torch.Tensor, population: torch.Tensor) -> float:
    inter = (population & missed).sum(1).float()
    union = (population | missed).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(iou.max())
