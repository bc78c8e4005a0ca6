"""Property prediction from weights: every method of the property-prediction task on one zoo,
over several split seeds, with the time each fit takes.

    python perf/property_prediction.py [--root ROOT] [--zoo digits-mlp] [--split model|cell]
                                       [--seeds 0 1 2] [--epochs E ...] [--workers 2]

ROOT defaults to $ZOO_ROOT, else ./zoo-data, and needs the zoo generated, its metrics computed
and its phases labelled (`zoo generate`, `zoo metrics`, `zoo phases`); it is only read. Runs the
task's protocol (`benchmarks.prediction.predict_properties`) for each (method, split seed) pair,
one process per pair on `--workers` processes of 1 torch thread, and prints, per method, the
mean and the range over the seeds of each score on the held-out rows (all phases together), and
the seconds a fit took (one fit per target: the mean over targets and seeds). A single split of
~60 held-out models moves R^2 by 0.1-0.3 (the few failed models that land in it decide most of
the variance), hence several seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date

import numpy as np

METHODS = [("constant", {}), ("linear", {"alpha": 10.0}), ("gbt", {}), ("statnn", {}),
           ("deepsets", {"augment": False}), ("deepsets", {"augment": True}),
           ("probing", {"head": "linear"}), ("probing", {"head": "mlp"})]
SCORES = ["r2_test_acc", "r2_gap", "r2_log_load", "r2_log_temperature", "r2_epoch", "phase_accuracy"]


class _Unit:
    def __init__(self, handle, model_ids):
        self.handle, self.model_ids = handle, model_ids


class _Call:
    def __init__(self, name, parameters):
        from benchmarks.registry import METHODS as REGISTERED

        self.method = REGISTERED[name]
        self.parameters = self.method.parameters(**parameters)


class _Timed:
    """Counts the seconds of every fit the protocol makes."""

    def __init__(self, call):
        self.method, self.parameters, self.seconds = self, call.parameters, []
        self._function = call.method.function

    def function(self, kind, p, seed):
        estimator, seconds = self._function(kind, p, seed), self.seconds

        class Timed:
            def fit(self, x, y):
                start = time.perf_counter()
                estimator.fit(x, y)
                seconds.append(time.perf_counter() - start)
                return self

            def predict(self, x):
                return estimator.predict(x)

        return Timed()


def run_one(root, zoo_name, name, parameters, split, seed, epochs):
    import torch

    torch.set_num_threads(1)
    import zoo
    from benchmarks.prediction import PredictionSettings, predict_properties

    z = zoo.open(root)
    ids = list(z.sql("select model_id from models where zoo = ? order by model_id", [zoo_name])["model_id"])
    timed = _Timed(_Call(name, parameters))
    settings = PredictionSettings(split=split, seed=seed, epochs=epochs)
    rows = predict_properties(_Unit(z, ids), timed, settings)
    scores = {r["metric"]: r["value"] for r in rows if r["phase"] == "all"}
    return name, parameters, seed, scores, float(np.mean(timed.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("ZOO_ROOT", "zoo-data"))
    parser.add_argument("--zoo", default="digits-mlp")
    parser.add_argument("--split", choices=["model", "cell"], default="model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=None, help="checkpoints used (default: the last)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None, help="method names to keep (default: all)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"{date.today()}  {cpu}  {os.cpu_count()} cores  python {platform.python_version()}")
    print(f"command: python {shlex.join(sys.argv)}")
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    jobs = [(args.root, args.zoo, name, p, args.split, seed, args.epochs) for name, p in methods for seed in args.seeds]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_one, *zip(*jobs)))
    print(f"{len(jobs)} runs on {args.workers} processes x 1 thread: {time.perf_counter() - start:.0f} s wall")
    print(f"\nzoo {args.zoo}, split by {args.split}, seeds {args.seeds}; mean over the seeds (min-max), all held-out rows\n")
    shown = [s for s in SCORES if any(s in r[3] for r in results)]
    print("| method | " + " | ".join(shown) + " | s per fit |")
    print("|---" * (len(shown) + 2) + "|")
    for name, p in methods:
        mine = [r for r in results if r[0] == name and r[1] == p]
        cells = []
        for s in shown:
            v = np.array([r[3][s] for r in mine])
            cells.append(f"{v.mean():.3f} ({v.min():.2f}-{v.max():.2f})")
        label = name + (f"({', '.join(f'{k}={v}' for k, v in p.items())})" if p else "")
        print(f"| {label} | " + " | ".join(cells) + f" | {np.mean([r[4] for r in mine]):.2f} |")


if __name__ == "__main__":
    main()
