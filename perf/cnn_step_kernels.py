"""Where a CNN stack's time goes, kernel by kernel, and how fast it could be if only its
convolutions cost anything: the bound behind the README's "3x needs fused kernels".

    python perf/cnn_step_kernels.py [--cells 4x32 4x128 8x128] [--steps 30] [--rounds 5]

For each fmnist-cnn cell of `perf/population_speed.py` (width x batch, its first stack as
`zoo generate` would train it, Fashion-MNIST 28 x 28, 1 thread, freed memory kept as the jobs keep
it), this times:

* the engine's training step (`gradients` of the stack `build_stack` gives, each model on its
  own batch), and the same step written out here kernel by kernel, in the engine's order, with a
  clock around each kernel; the written-out step must give bitwise the engine's gradients, so
  its kernel list is the engine's;
* the engine's evaluation forward over the 1,000 test images, in the engine's chunks, and the
  same written out (it must give bitwise the engine's logits);
* `train_stack` of the whole stack, against what its steps and evaluations add up to.

Kernels are split into convolutions (forward and both backward products: arithmetic) and the
passes over the feature maps around them (BatchNorm, ReLU, max-pool, their backward, layout
copies: memory traffic). The last line of each cell says how much faster `train_stack` would be
if only the convolutions took time (every other kernel of the steps and evaluations free, and
the SGD updates, batch gathering and scoring too): an upper bound on what fusing the passes, or
any other work outside the convolutions, could give with torch's convolution kernels.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from generators.plan import group_into_stacks
from generators.stacked import as_channels_last, build_stack, max_pool_2x2, relu_then_pool_2x2, train_stack
from generators.training import batch_sizes
from population_speed import write_cnn_catalog
from zoo.catalog import load_catalog
from zoo.datasets import load_dataset
from zoo.launch import keep_freed_memory

aten = torch.ops.aten
CHANNELS_LAST = torch.channels_last


class Clock:
    """Seconds per labelled kernel, summed over calls (a label's kind: its first word), and the
    floating-point operations of the convolutions, summed the same way (`flops`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, label: str) -> None:
        now = time.perf_counter()
        self.seconds[label] += now - self.last
        self.last = now


def is_convolution(label: str) -> bool:
    return label.startswith("conv")


def convolution_flops(out: torch.Tensor, weight: torch.Tensor) -> float:
    """2 x multiply-adds of a convolution's forward: each output value takes (input channels per
    group) x kernel height x kernel width of them; weight (M, C_out, C_in per group, kh, kw)."""
    return 2.0 * out.numel() * math.prod(weight.shape[2:])


def written_out_step(stack, x: torch.Tensor, y: torch.Tensor, means: dict, clock: Clock) -> list[torch.Tensor]:
    """The engine's CNN training step, kernel by kernel: forward, loss gradient, backward."""
    n_models, batch = y.shape
    body = stack.layers[:-3]
    params = dict(zip(stack.names, stack.params))
    clock.start()
    h = as_channels_last(x.transpose(0, 1).reshape(batch, -1, *x.shape[3:]))
    clock("layout: input to channels-last")
    saved = []
    for k, layer in enumerate(body):
        if isinstance(layer, nn.Conv2d):
            weight = params[f"{k}.weight"]
            saved.append(h)
            h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), None, layer.stride, layer.padding, layer.dilation, groups=n_models)
            clock(f"conv {k} forward")
            clock.flops[f"conv {k} forward"] += convolution_flops(h, weight)
            clock.flops[f"conv {k} backward"] += (2 if k > 0 else 1) * convolution_flops(h, weight)  # (input and weight gradients)
        elif isinstance(layer, nn.BatchNorm2d):
            out, mean, invstd = aten.native_batch_norm(h, params[f"{k}.weight"].reshape(-1), params[f"{k}.bias"].reshape(-1),
                                                       means[f"{k}.running_mean"], means[f"{k}.running_var"], True,
                                                       layer.momentum, layer.eps)
            saved.append((h, mean, invstd))
            h = out
            clock(f"batchnorm {k} forward")
        elif isinstance(layer, nn.ReLU):
            if relu_then_pool_2x2(body, k):
                saved.append(None)  # taken after the pool, as the engine takes it
            else:
                h = h.relu_()
                saved.append(h)
                clock(f"relu {k} forward")
        else:
            pooled, indices = aten.max_pool2d_with_indices(h, [2, 2], [2, 2], [0, 0], [1, 1], False)
            clock(f"max-pool {k} forward")
            if relu_then_pool_2x2(body, k - 1):
                pooled = pooled.relu_()
                clock(f"relu {k - 1} forward (pooled)")
            saved.append((h, indices, pooled))
            h = pooled
    pooled = h.mean((2, 3)).reshape(batch, n_models, -1).transpose(0, 1)
    weight, bias = stack.params[-2], stack.params[-1]
    logits = torch.baddbmm(bias[:, None, :], pooled, weight)
    g = torch.softmax(logits, 2)
    g.scatter_add_(2, y[:, :, None], torch.full((n_models, batch, 1), -1.0)).div_(batch)
    grads = {len(stack.params) - 2: torch.bmm(pooled.transpose(1, 2), g), len(stack.params) - 1: g.sum(1)}
    g = torch.bmm(g, weight.transpose(1, 2)).transpose(0, 1).reshape(batch, -1, 1, 1).div_(h.shape[2] * h.shape[3])
    g = g.expand(h.shape)
    clock("head: average pool, linear, loss gradient")
    index = {name: i for i, name in enumerate(stack.names)}
    for k in reversed(range(len(body))):
        layer, kept = body[k], saved[k]
        if isinstance(layer, nn.ReLU):
            if not relu_then_pool_2x2(body, k):
                g = aten.threshold_backward(g, kept, 0).contiguous(memory_format=CHANNELS_LAST)
                clock(f"relu {k} backward")
        elif isinstance(layer, nn.MaxPool2d):
            inputs, indices, pooled = kept
            g = g.contiguous(memory_format=CHANNELS_LAST)
            clock("layout: gradient to channels-last")
            if relu_then_pool_2x2(body, k - 1):
                g = aten.threshold_backward(g, pooled, 0)
                clock(f"relu {k - 1} backward (pooled)")
            g = aten.max_pool2d_with_indices_backward(g, inputs, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
            clock(f"max-pool {k} backward")
        elif isinstance(layer, nn.BatchNorm2d):
            inputs, mean, invstd = kept
            g, g_weight, g_bias = aten.native_batch_norm_backward(
                g, inputs, params[f"{k}.weight"].reshape(-1), means[f"{k}.running_mean"], means[f"{k}.running_var"],
                mean, invstd, True, layer.eps, [True, True, True])
            grads[index[f"{k}.weight"]], grads[index[f"{k}.bias"]] = g_weight.reshape(n_models, -1), g_bias.reshape(n_models, -1)
            clock(f"batchnorm {k} backward")
        else:
            weight = params[f"{k}.weight"]
            g_input, g_weight, _ = aten.convolution_backward(
                g, kept, weight.reshape(-1, *weight.shape[2:]), None, list(layer.stride), list(layer.padding),
                list(layer.dilation), False, [0, 0], n_models, [k > 0, True, False])
            grads[index[f"{k}.weight"]] = g_weight.reshape(weight.shape)
            g = g_input
            clock(f"conv {k} backward")
    return [grads[i] for i in range(len(stack.params))]


def written_out_forward(stack, x: torch.Tensor, clock: Clock) -> torch.Tensor:
    """The engine's evaluation forward of one chunk of shared inputs, kernel by kernel: the first
    convolution holds every model's filters, BatchNorm uses the running statistics, 2 x 2 max-pools
    are two elementwise maxima of strided views, each ReLU before a pool runs after it."""
    n_models, batch = len(stack.specs), x.shape[0]
    body = stack.layers[:-3]
    params = dict(zip(stack.names, stack.params))
    clock.start()
    h = as_channels_last(x)
    clock("layout: input to channels-last")
    for k, layer in enumerate(body):
        if isinstance(layer, nn.Conv2d):
            weight = params[f"{k}.weight"]
            h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), None, layer.stride, layer.padding, layer.dilation,
                         groups=1 if k == 0 else n_models)
            clock(f"conv {k} forward")
            clock.flops[f"conv {k} forward"] += convolution_flops(h, weight)
        elif isinstance(layer, nn.BatchNorm2d):
            h = F.batch_norm(h, stack.buffers[f"{k}.running_mean"], stack.buffers[f"{k}.running_var"],
                             params[f"{k}.weight"].reshape(-1), params[f"{k}.bias"].reshape(-1), False, layer.momentum, layer.eps)
            clock(f"batchnorm {k} forward")
        elif isinstance(layer, nn.ReLU):
            if not relu_then_pool_2x2(body, k):
                h = torch.relu(h)
                clock(f"relu {k} forward")
        else:
            h = max_pool_2x2(h)
            clock(f"max-pool {k} forward")
            if relu_then_pool_2x2(body, k - 1):
                h = h.relu_()
                clock(f"relu {k - 1} forward (pooled)")
    h = h.mean((2, 3)).reshape(batch, n_models, -1).transpose(0, 1)
    logits = torch.baddbmm(stack.params[-1][:, None, :], h, stack.params[-2])
    clock("head: average pool, linear")
    return logits


def best_of(rounds: int, run) -> tuple[float, dict[str, float], dict[str, float]]:
    """The fastest of `rounds` calls of run(clock) -> calls made; its seconds per call, the kernel
    seconds per call of that round, and each convolution's rate in GFLOP/s there."""
    best, kernels, rates = math.inf, {}, {}
    for _ in range(rounds):
        clock = Clock()
        start = time.perf_counter()
        calls = run(clock)
        seconds = (time.perf_counter() - start) / calls
        if seconds < best:
            best, kernels = seconds, {label: s / calls for label, s in clock.seconds.items()}
            rates = {label: clock.flops[label] / clock.seconds[label] / 1e9 for label in clock.flops}
    return best, kernels, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["4x32", "4x128", "8x128"])
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the train_stack run (as perf/population_speed.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    print(f"{torch.__version__}, 1 thread; fastest of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cells:
            width, batch = (int(v) for v in cell.split("x"))
            catalog, name = write_cnn_catalog(width, batch, args.epochs, Path(tmp))
            specs = group_into_stacks(load_catalog(str(catalog))[name].models())[0]
            data = load_dataset(specs[0].dataset)
            t = specs[0].training
            stack = build_stack(specs, torch.device("cpu"))
            assert type(stack).__name__ == "_CNNStack"  # (the written-out CNN engine)
            n_models = len(specs)
            generator = torch.Generator().manual_seed(0)
            order = torch.stack([torch.randperm(len(data.x_train), generator=generator)[:batch] for _ in specs])
            x, y = data.x_train[order], data.y_train[order]

            # training step: the engine's, then written out (same gradients, bitwise)
            means = {k: v.clone() for k, v in stack.buffers.items()}
            engine_grads = stack.gradients(x, y)
            ours = written_out_step(stack, x, y, means, Clock())
            assert all(torch.equal(a, b) for a, b in zip(engine_grads, ours)), "the written-out step differs from the engine's"
            step, _, _ = best_of(args.rounds, lambda clock: repeat(args.steps, lambda: stack.gradients(x, y)))
            step_written, step_kernels, step_rates = best_of(
                args.rounds, lambda clock: repeat(args.steps, lambda: written_out_step(stack, x, y, means, clock)))

            # evaluation forward over the test images, in the engine's chunks
            chunk = stack.evaluation_chunk(data.x_test, t.eval_batch_size)
            starts = range(0, len(data.x_test), chunk)
            with torch.no_grad():
                assert all(torch.equal(stack.logits(data.x_test[i : i + chunk], training=False),
                                       written_out_forward(stack, data.x_test[i : i + chunk], Clock())) for i in starts), \
                    "the written-out forward differs from the engine's"
                per_image, _, _ = best_of(args.rounds, lambda clock: sum(
                    len(stack.logits(data.x_test[i : i + chunk], training=False)[0]) for i in starts))
                per_image_written, eval_kernels, eval_rates = best_of(args.rounds, lambda clock: sum(
                    len(written_out_forward(stack, data.x_test[i : i + chunk], clock)[0]) for i in starts))

            # the whole stack, and what its parts add up to: the steps in full-batch units (an
            # epoch's last, short batch counted by its share of a batch, which if anything
            # understates its convolutions' time, so the bound below stays an upper bound)
            sizes = batch_sizes(len(data.x_train), t)
            n_steps, full_steps = args.epochs * len(sizes), args.epochs * sum(sizes) / batch
            n_images = (args.epochs + 1) * (len(data.x_train) + len(data.x_test))
            whole = min(timed(lambda: train_stack(specs, data)) for _ in range(2))
            parts = full_steps * step + n_images * per_image
            floor = (full_steps * sum(s for k, s in step_kernels.items() if is_convolution(k))
                     + n_images * sum(s for k, s in eval_kernels.items() if is_convolution(k)))

            print(f"\n## {cell}: a stack of {n_models} models of width {width}, batch {batch} "
                  f"({n_steps} steps, {n_images:,} images evaluated per model in {args.epochs} epochs)")
            print(f"training step: the engine {step * 1e3:.2f} ms, written out {step_written * 1e3:.2f} ms (same gradients); "
                  f"evaluation: {per_image * 1e6:.1f} / {per_image_written * 1e6:.1f} us per image (chunks of {chunk}, same logits)")
            print("| kernel | training step, ms | share | evaluation, us per image | share |")
            print("|---|---|---|---|---|")
            for label in sorted(set(step_kernels) | set(eval_kernels), key=lambda k: -step_kernels.get(k, 0.0)):
                s, e = step_kernels.get(label), eval_kernels.get(label)
                print(f"| {label} | {'-' if s is None else f'{s * 1e3:.2f}'} | {'-' if s is None else f'{s / step_written:.0%}'} | "
                      f"{'-' if e is None else f'{e * 1e6:.2f}'} | {'-' if e is None else f'{e / per_image_written:.0%}'} |")
            conv_step = sum(s for k, s in step_kernels.items() if is_convolution(k))
            conv_eval = sum(s for k, s in eval_kernels.items() if is_convolution(k))
            print(f"convolutions: {conv_step / step_written:.0%} of a step, {conv_eval / per_image_written:.0%} of the evaluation; "
                  "GFLOP/s: " + ", ".join(f"{label} {rate:.0f}" for label, rate in step_rates.items())
                  + "; evaluation: " + ", ".join(f"{label} {rate:.0f}" for label, rate in eval_rates.items()))
            print(f"train_stack of the stack: {whole:.2f} s; its {n_steps} steps + {n_images:,} images evaluated add up to "
                  f"{parts:.2f} s ({parts / whole:.0%})")
            print(f"the convolutions alone (every other kernel free, the SGD update and scoring too): {floor:.2f} s, "
                  f"**at most {whole / floor:.2f}x** faster than today")


def repeat(n: int, run) -> int:
    for _ in range(n):
        run()
    return n


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
