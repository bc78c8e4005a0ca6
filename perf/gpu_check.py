"""GPU check (under 10 minutes on one GPU): ResNet-18s on synthetic CIFAR-shaped data.

For each width, trains K models for a fixed number of SGD steps two ways, in this process:
  - one at a time: the reference path's step (`generators.training.train_step`), model after model;
  - stacked: the K models as one computation (torch.func: their parameters and BatchNorm buffers
    stacked, the forward pass vmapped, one backward, one SGD step over the stacks).
Prints images/s for both and the ratio, the peak GPU memory, and checks that the stacked step
equals the one-at-a-time step for model 0 (after the first step, to float tolerance).

Then the metric families on the device against the CPU, for two ResNet-18s (`--metric-width`)
after a few SGD steps: Hessian top eigenvalue and trace (krylov), spectral alpha per layer, CKA,
mode connectivity (linear path and a one-epoch Bezier curve): the largest relative difference
of each and the CPU/device time ratio.

    python perf/gpu_check.py                                   # on the GPU, defaults below
    python perf/gpu_check.py --precision bf16 --channels-last  # the GPU path's speed options
    python perf/gpu_check.py --device cpu --widths 2 --models 2 --steps 2 --batch 8   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generators.training import train_step  # noqa: E402
from zoo.architectures import build_model  # noqa: E402
from zoo.device import run_device, set_determinism  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_at_a_time(models, data, labels, steps, batch, precision) -> float:
    """Seconds to train each model for `steps` steps, one model after another."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in models]
    synchronize(data.device)
    start = time.perf_counter()
    for model, optimizer in zip(models, optimizers):
        model.train()
        for step in range(steps):
            idx = slice(step * batch, (step + 1) * batch)
            train_step(model, optimizer, data[idx], labels[idx], precision=precision)
    synchronize(data.device)
    return time.perf_counter() - start


def stacked(models, data, labels, steps, batch, precision) -> tuple[float, dict]:
    """Seconds to train the models as one vmapped stack for `steps` steps; the stacked state."""
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def forward(p, b, x):
        return functional_call(base, (p, b), (x,))

    run = vmap(forward, in_dims=(0, 0, None), randomness="different")
    autocast = torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    synchronize(data.device)
    start = time.perf_counter()
    for step in range(steps):
        idx = slice(step * batch, (step + 1) * batch)
        with autocast:
            logits = run(params, buffers, data[idx])  # (K, B, classes)
        # the sum of the models' mean losses: each model's gradient is its own loss's gradient
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels[idx].repeat(len(models)), reduction="sum") / batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(data.device)
    return time.perf_counter() - start, params


def metrics_on_device(device: torch.device, width: int, data, labels, batch: int) -> None:
    """The metric families on `device` and on the CPU for the same two models (see the docstring)."""
    from metrics.cka import cka_between
    from metrics.connectivity import connectivity_metrics
    from metrics.hessian import krylov_top_eigenvalues_and_trace
    from metrics.spectral import spectral_metrics_many

    spec = {"name": "resnet", "width": width, "depth": 18}
    models = [build_model(spec, (3, 32, 32), 10, seed=s) for s in (0, 1)]
    x, y = data[: 4 * batch].cpu().contiguous(), labels[: 4 * batch].cpu()
    for model in models:  # a few steps, so BatchNorm statistics and weights are not the init's
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for step in range(4):
            train_step(model, optimizer, x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch])

    def run(where: torch.device) -> tuple[dict[str, list[float]], dict[str, float]]:
        placed = [copy.deepcopy(m).to(where) for m in models]
        parts = [(x[i:i + batch].to(where), y[i:i + batch].to(where)) for i in range(0, len(x), batch)]
        values, seconds = {}, {}

        def timed(name, fn):
            synchronize(where)
            start = time.perf_counter()
            values[name] = fn()
            synchronize(where)
            seconds[name] = time.perf_counter() - start

        whole = [(x[:256].to(where), y[:256].to(where))]
        timed("hessian", lambda: (lambda r: [float(r.eigenvalues[0]), float(r.trace)])(
            krylov_top_eigenvalues_and_trace(placed[0], whole, top_n=1, block=4, max_blocks=10, trace_tol=0.05,
                                             max_probes=20, seed=0)))
        timed("spectral alpha", lambda: [m["alpha"] for layers in spectral_metrics_many(placed, (100, 200), 10)
                                         for m in layers.values() if m["n_eigs"] >= 20])
        timed("cka", lambda: list(cka_between(placed[0], placed[1], x[:512]).values()))
        timed("connectivity", lambda: list(connectivity_metrics(placed[0], placed[1], parts, parts[:1], n_points=3,
                                                                bezier=True, bezier_epochs=1, seed=0).values()))
        return values, seconds

    cpu_values, cpu_seconds = run(torch.device("cpu"))
    dev_values, dev_seconds = run(device)
    print(f"metric families, ResNet-18 width {width}, {device} vs cpu:")
    for name in cpu_values:
        a, b = torch.tensor(cpu_values[name], dtype=torch.float64), torch.tensor(dev_values[name], dtype=torch.float64)
        gap = float(((a - b).abs() / a.abs().clamp(min=1e-6)).max())
        print(f"  {name:<15} max relative difference {gap:.1e}; cpu {cpu_seconds[name]:.2f} s, "
              f"{device.type} {dev_seconds[name]:.2f} s ({cpu_seconds[name] / dev_seconds[name]:.1f}x)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: $ZOO_DEVICE, else cuda if present, else cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--models", type=int, default=4, help="models per stack")
    parser.add_argument("--steps", type=int, default=30, help="SGD steps per model (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels (slower)")
    parser.add_argument("--metric-width", type=int, default=16, help="the metric check's ResNet-18 width (0: skip it)")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else run_device()
    if device.type == "cuda":
        set_determinism(args.deterministic)
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; precision {args.precision}; channels_last {args.channels_last}; "
          f"{args.models} models per stack, {args.steps} steps of batch {args.batch}")
    warm = 3
    n = (args.steps + warm) * args.batch
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(n, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (n,), generator=generator).to(device)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    data = data.contiguous(memory_format=layout)
    print(f"{'width':>6} {'params':>10} {'one-at-a-time img/s':>20} {'stacked img/s':>14} {'ratio':>6} {'peak GB':>8}  step check")
    for width in args.widths:
        spec = {"name": "resnet", "width": width, "depth": 18}
        fresh = [build_model(spec, (3, 32, 32), 10, seed=s).to(device, memory_format=layout) for s in range(args.models)]
        # the first step both ways, from the same weights: model 0 must agree
        a = [copy.deepcopy(m) for m in fresh]
        one_at_a_time(a, data, labels, 1, args.batch, args.precision)
        _, stacked_params = stacked([copy.deepcopy(m) for m in fresh], data, labels, 1, args.batch, args.precision)
        tolerance = 5e-2 if args.precision == "bf16" else 1e-3
        gaps = [float((stacked_params[k][0] - p).detach().abs().max()) for k, p in a[0].named_parameters()]
        check = f"max |diff| {max(gaps):.1e} ({'ok' if max(gaps) < tolerance else 'MISMATCH'})"
        # warm-up, then the timed runs
        one_at_a_time([copy.deepcopy(m) for m in fresh], data, labels, warm, args.batch, args.precision)
        stacked([copy.deepcopy(m) for m in fresh], data, labels, warm, args.batch, args.precision)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        images = args.models * args.steps * args.batch
        sequential_s = one_at_a_time([copy.deepcopy(m) for m in fresh], data[warm * args.batch:], labels[warm * args.batch:],
                                     args.steps, args.batch, args.precision)
        stacked_s, _ = stacked([copy.deepcopy(m) for m in fresh], data[warm * args.batch:], labels[warm * args.batch:],
                               args.steps, args.batch, args.precision)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        n_params = sum(p.numel() for p in fresh[0].parameters())
        print(f"{width:>6} {n_params:>10,} {images / sequential_s:>20,.0f} {images / stacked_s:>14,.0f} "
              f"{sequential_s / stacked_s:>5.2f}x {peak:>8.2f}  {check}")
    if args.metric_width:
        metrics_on_device(device, args.metric_width, data, labels, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
