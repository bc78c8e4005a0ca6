"""Training throughput: a population trained as one stack against the same models trained one
at a time (the reference path), per model shape, in one process run; and the stacks' achieved
GFLOP/s as a fraction of this machine's float32 matmul peak, measured in the same run.

    python perf/train_throughput.py [--models 64] [--epochs 20] [--loop-models 4] [--threads 2]

Shapes: the digits-mlp zoo's MLPs (64-w-w-10, batch 32) and small CNNs, on digits (8x8) and on
the fmnist-cnn zoo's Fashion-MNIST shape (28x28; first 2,000 training images, needs Debian's
dataset-fashion-mnist, skipped with a note otherwise). Both paths run the whole recipe (SGD
momentum, an evaluation of every model on train and test after every epoch, checkpoints), with
the same seeds. Loop models/s is measured on `--loop-models` models; stacked on `--models`.
FLOPs count training only (forward + backward = 3 x forward multiply-adds x 2 per sample; the
evaluations are not counted), over the stack's whole wall time: a lower bound.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import date

import torch

from generators.plan import stack_key
from generators.stacked import train_stack
from generators.training import train
from zoo.catalog import parse_zoo
from zoo.datasets import load_dataset
from zoo.errors import ZooError


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """float32 GFLOP/s of a large square matmul (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def forward_macs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one sample's forward pass through the Linear and Conv2d layers."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Linear):
            macs += module.in_features * module.out_features
        else:
            macs += output[0].numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return macs


def population(name: str, dataset: dict, architecture: dict, batch_size: int, epochs: int, n_models: int):
    zoo = parse_zoo(name, {
        "description": name, "dataset": dataset, "architecture": architecture,
        "load": {"name": "width", "values": [architecture["width"]]}, "temperature": {"name": "batch_size", "values": [batch_size]},
        "seeds": list(range(n_models)), "training": {"lr": 0.05, "momentum": 0.9, "epochs": epochs},
        "checkpoints": [0, epochs],
    })
    return zoo.models()


def measure(label: str, specs, loop_models: int, peak: float) -> None:
    data = load_dataset(specs[0].dataset)
    # warm both paths (first calls build kernels), outside the timings
    train(specs[0], data)
    train_stack(specs[:2], data)
    start = time.perf_counter()
    for spec in specs[:loop_models]:
        train(spec, data)
    loop_rate = loop_models / (time.perf_counter() - start)
    start = time.perf_counter()
    trained = train_stack(specs, data)
    seconds = time.perf_counter() - start
    rate = len(specs) / seconds
    from zoo.architectures import build_model

    model = build_model(specs[0].architecture, specs[0].input_shape, specs[0].n_classes)
    flops = 6 * forward_macs(model, specs[0].input_shape) * len(data.x_train) * specs[0].training.epochs * len(specs)
    gflops = flops / seconds / 1e9
    accuracy = sum(t.curves[-1]["test_acc"] for t in trained) / len(trained)
    default = "stacked by default" if stack_key(specs[0]) else "reference path by default"
    print(f"{label:<40} {sum(p.numel() for p in model.parameters()):>7} {loop_rate:>9.2f} {rate:>9.2f} "
          f"{rate / loop_rate:>6.1f}x {gflops:>8.1f} {gflops / peak:>6.1%}  acc {accuracy:.3f}  ({default})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=64, help="models in each stack")
    parser.add_argument("--epochs", type=int, default=20, help="default: the digits-mlp recipe")
    parser.add_argument("--loop-models", type=int, default=4, help="models trained one at a time for the baseline")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fmnist", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"{date.today()}  {cpu}  torch {torch.__version__}  {args.threads} threads")
    print(f"float32 matmul peak (2048^3, best of 10): {peak:.1f} GFLOP/s")
    print(f"{args.models} models per stack, {args.loop_models} in the loop, {args.epochs} epochs, SGD momentum 0.9, evaluation every epoch")
    print(f"{'shape':<40} {'params':>7} {'loop m/s':>9} {'stack m/s':>9} {'ratio':>7} {'GFLOP/s':>8} {'peak':>7}")
    digits = {"name": "digits"}
    for width in (8, 32, 128):
        measure(f"digits MLP 64-{width}-{width}-10, batch 32", population("mlp", digits, {"name": "mlp", "width": width}, 32, args.epochs, args.models), args.loop_models, peak)
    for width, batch in ((4, 32), (16, 32)):
        specs = population("cnn", digits, {"name": "cnn", "width": width, "depth": 2}, batch, args.epochs, args.models)
        measure(f"digits CNN c={width} (BN), batch {batch}", specs, args.loop_models, peak)
    if args.fmnist:
        fmnist = {"name": "fashion-mnist", "train_size": 2000}
        try:
            specs = population("fcnn", fmnist, {"name": "cnn", "width": 4, "depth": 2}, 128, args.epochs, min(args.models, 16))
            measure("fmnist CNN c=4 (BN), batch 128, 2k images", specs, args.loop_models, peak)
        except ZooError as e:
            print(f"fmnist shapes skipped: {e}")


if __name__ == "__main__":
    main()
