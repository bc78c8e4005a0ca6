"""Mid-model resume: what saving the training state costs. One process run.

    python perf/resume_overhead.py [--zoo fmnist-resnet18-small] [--epochs 3]

1. One model of `--zoo` (its first) trained in this process without saves (the baseline, after an
   untimed warm-up run; best of two, alternated)
   and saving at every epoch end (ZOO_RESUME_EVERY_S=0, the most a run can save); prints the
   time ratio and checks that both runs give the same bits.
2. A ResNet-18 at width 64 (11.2M parameters, CIFAR-shaped): the time to save and to load its
   state after an SGD step (weights, momentum, schedule, generators, no checkpoints kept yet) and
   the file size. The default interval (300 s) pays that once every 5 minutes of training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from generators.resume import Saver, TrainingState, load_state, save_state
from generators.training import derive_seed, make_optimizer, make_schedule, train
from zoo.architectures import build_model
from zoo.catalog import load_catalog, parse_zoo
from zoo.datasets import load_dataset
from zoo.weights import sha256

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="fmnist-resnet18-small")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as jobs train

    spec = load_catalog(REPO / "catalog.yaml")[args.zoo].models()[0]
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": args.epochs})})
    data = load_dataset(spec.dataset)
    saves: list[float] = []
    real = Saver.save

    def timed_save(self, state):
        began = time.perf_counter()
        real(self, state)
        saves.append(time.perf_counter() - began)

    Saver.save = timed_save
    train(spec, data)  # warm-up (first-call allocations), not timed
    times: dict[str, list[float]] = {"plain": [], "saving": []}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # alternated, best of two each: the machine's noise is larger than the saves
            for kind in ("plain", "saving"):
                os.environ["ZOO_RESUME_EVERY_S"] = "0"
                saves.clear()
                start = time.perf_counter()
                result = train(spec, data, resume=Path(tmp) / "state.safetensors" if kind == "saving" else None)
                times[kind].append(time.perf_counter() - start)
                (Path(tmp) / "state.safetensors").unlink(missing_ok=True)
                results[kind] = result
    Saver.save = real
    baseline, with_saves = min(times["plain"]), min(times["saving"])
    plain, saving = results["plain"], results["saving"]
    same = all(sha256(plain.checkpoints[e]) == sha256(saving.checkpoints[e]) for e in plain.checkpoints)
    n, per_save = len(saves), sum(saves) / max(len(saves), 1)
    print(f"{args.zoo} model 0 ({spec.architecture}, {args.epochs} epochs, 1 thread):")
    print(f"  no saves {baseline:.2f} s; a save at each of {n} epoch ends {with_saves:.2f} s "
          f"(ratio {with_saves / baseline:.3f}; {per_save * 1e3:.1f} ms per save); same bits: {same}")

    body = {"description": "r", "dataset": {"name": "digits"}, "architecture": {"name": "resnet", "depth": 18},
            "load": {"name": "width", "values": [64]}, "temperature": {"name": "batch_size", "values": [8]},
            "seeds": [0], "training": {"lr": 0.1, "momentum": 0.9, "schedule": "onecycle", "epochs": 150}, "checkpoints": "every"}
    big = parse_zoo("r", body).models()[0]
    model = build_model(big.architecture, (3, 32, 32), 10, seed=derive_seed(0, "init"))
    optimizer = make_optimizer(model.parameters(), big.training)
    schedule = make_schedule(optimizer, big.training, 1000)
    model(torch.randn(8, 3, 32, 32)).sum().backward()
    optimizer.step()
    schedule.step()
    g = torch.Generator().manual_seed(0)
    state = TrainingState(epoch=1, model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                          generators={"order": g.get_state(), "augment": g.get_state()},
                          buffers={"order": torch.empty(0, dtype=torch.int64)}, curves=[], checkpoints={}, seconds=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        start = time.perf_counter()
        save_state(path, big, state)
        saved = time.perf_counter() - start
        start = time.perf_counter()
        loaded = load_state(path, big)
        read = time.perf_counter() - start
        size = path.stat().st_size
    n_params = sum(p.numel() for p in model.parameters())
    assert loaded is not None and loaded.epoch == 1
    print(f"ResNet-18 width 64 ({n_params:,} parameters): state file {size / 2**20:.1f} MiB, "
          f"save {saved:.2f} s, load {read:.2f} s")


if __name__ == "__main__":
    main()
