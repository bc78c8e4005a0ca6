"""A CNN stack's evaluation forward: the fast path against the layer-by-layer one, in one process run.

    python perf/cnn_eval_forward.py [--cells 4x32 4x128 8x128] [--rounds 8]

Evaluation (the train and test splits after every epoch) is about half of the work of the
fmnist-cnn populations of `perf/population_speed.py` at 2 epochs. Without gradients, the stacked
engine max-pools 2 x 2 windows by two elementwise maxima of strided views and takes each ReLU
after its max-pool; with gradients on, the same forward runs layer by layer (ReLU, then
`max_pool2d`). Both give the same values (checked here). For each cell (width x batch, the first
stack `zoo generate` would train, Fashion-MNIST 28 x 28), this times the forward over the 1,000
test images in the chunks the engine's evaluation uses, both ways, 1 thread, with freed memory
kept as `zoo generate`'s jobs keep it; `--rounds` alternated rounds, the fastest of each kept.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from generators.plan import group_into_stacks
from generators.stacked import build_stack
from population_speed import write_cnn_catalog
from zoo.catalog import load_catalog
from zoo.datasets import load_dataset
from zoo.launch import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["4x32", "4x128", "8x128"])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    print("CNN stack, forward over 1,000 test images in evaluation chunks, 1 thread, fastest of "
          f"{args.rounds} alternated rounds:")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cells:
            width, batch = (int(v) for v in cell.split("x"))
            catalog, name = write_cnn_catalog(width, batch, 1, Path(tmp))
            specs = load_catalog(str(catalog))[name].models()
            data = load_dataset(specs[0].dataset)
            stack = build_stack(group_into_stacks(specs)[0], torch.device("cpu"))
            assert type(stack).__name__ == "_CNNStack"  # (the written-out CNN engine)
            n_models = len(stack.specs)
            chunk = stack.evaluation_chunk(data.x_test, specs[0].training.eval_batch_size)  # (as its evaluation runs)

            def forward(grad: bool) -> list[torch.Tensor]:
                with torch.set_grad_enabled(grad):
                    return [stack.logits(data.x_test[i : i + chunk], training=False) for i in range(0, len(data.x_test), chunk)]

            assert all(torch.equal(a, b) for a, b in zip(forward(False), forward(True)))
            best = {False: math.inf, True: math.inf}
            for _ in range(args.rounds):
                for grad in best:
                    start = time.perf_counter()
                    forward(grad)
                    best[grad] = min(best[grad], time.perf_counter() - start)
            print(f"  width {width} x batch {batch} ({n_models} models, chunks of {chunk}): fast path "
                  f"{best[False] * 1e3:.1f} ms, layer by layer {best[True] * 1e3:.1f} ms, "
                  f"**{best[True] / best[False]:.2f}x** (the same values)")


if __name__ == "__main__":
    main()
