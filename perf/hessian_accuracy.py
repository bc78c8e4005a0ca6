"""The stored Hessian metrics of a zoo against the exact Hessian, model by model, per method.

    python -m zoo generate digits-mlp --root R && python -m zoo metrics digits-mlp --only hessian --root R
    python perf/hessian_accuracy.py --root R [--zoo digits-mlp] [--max-width 32] [--cache FILE] [--methods stored]

For every model of the zoo with width (load) <= --max-width, final epoch, train and test: the
stored values of the default method (`krylov`: read from the metrics table that `zoo metrics`
wrote) and the values of the other settings, computed here through the same family function
`zoo metrics` calls (`metrics.families.FAMILIES["hessian"].compute`, same per-model streams):
`lanczos`, `pyhessian` (the published protocol), and both of ours with the exact trace turned
off (`trace_exact_max_params: 0`), which shows the stochastic path and whether its stored error
bars are honest. The exact reference: the dense float64 Hessian of the mean cross-entropy on the
same first-n samples (`hessian_samples_*`), built column by column from float64 Hessian-vector
products of unit vectors (256 at a time); its trace, and its top eigenvalue by ARPACK (tol 1e-12).
The reference values are cached in --cache (JSON) so that a rerun only recomputes the estimates.

Prints, per method, split and quantity: the median and maximum relative error, the share of
models within the issue's bound (trace 1%, top eigenvalue 0.5%), and the share whose actual error
is within 3 stored stderr (plus 1e-5 relative: the float32 rounding of an exact value).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse.linalg
import torch

import zoo
from metrics.families import FAMILIES, ModelContext
from metrics.hessian import hvp_block
from metrics.modes import eval_mode

SETTINGS = {
    "krylov, exact trace (stored)": None,
    "lanczos, exact trace": {"method": "lanczos"},
    "krylov, stochastic trace": {"trace_exact_max_params": 0},
    "lanczos (Hutch++), stochastic trace": {"method": "lanczos", "trace_exact_max_params": 0},
    "pyhessian (published protocol)": {"method": "pyhessian"},
}
FLOAT_FLOOR = 1e-5
BOUNDS = {"trace": 0.01, "top_eig": 0.005}


def exact(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(trace, top eigenvalue) of the dense float64 Hessian on (x, y)."""
    m64 = copy.deepcopy(model).double()
    params = [p for p in m64.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    hessian = np.empty((n_params, n_params))
    with eval_mode(m64):
        for start in range(0, n_params, 256):
            rows = torch.arange(start, min(start + 256, n_params))
            units = torch.zeros(n_params, len(rows), dtype=torch.float64)
            units[rows, torch.arange(len(rows))] = 1
            hessian[:, start:start + len(rows)] = hvp_block(m64, params, [(x.double(), y)], len(x), units).numpy()
    hessian = (hessian + hessian.T) / 2
    top = scipy.sparse.linalg.eigsh(hessian, k=1, which="LA", tol=1e-12, return_eigenvectors=False)[0]
    return float(np.trace(hessian)), float(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--zoo", default="digits-mlp")
    parser.add_argument("--max-width", type=int, default=32)
    parser.add_argument("--cache", default=None, help="JSON file of exact values (default: ROOT/exact-hessian.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="all", choices=["all", "stored"],
                        help="stored: only check the stored values (no other method is computed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    z = zoo.open(args.root)
    models = z.sql("select model_id, load, epochs from models where zoo = ? and load <= ? order by load, temperature, seed",
                   [args.zoo, args.max_width])
    if models.empty:
        raise SystemExit(f"no models of {args.zoo} with width <= {args.max_width} under {args.root}")
    stored = z.sql("select m.model_id, m.name, m.value, m.settings from metrics m join models using (model_id) "
                   "where m.family = 'hessian' and m.epoch = models.epochs")
    cache_path = Path(args.cache or Path(args.root) / "exact-hessian.json")
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    family = FAMILIES["hessian"]
    values: dict[str, dict] = {name: {} for name in SETTINGS}
    seconds = {name: 0.0 for name in SETTINGS}
    started = time.perf_counter()
    for i, row in enumerate(models.itertuples(index=False)):
        mine = stored[stored.model_id == row.model_id]
        if mine.empty:
            raise SystemExit(f"{row.model_id}: no stored hessian metrics; run `zoo metrics {args.zoo} --only hessian` first")
        if json.loads(mine["settings"].iloc[0])["settings"]["method"] != "krylov":
            raise SystemExit(f"{row.model_id}: the stored hessian metrics are not the default method")
        values["krylov, exact trace (stored)"][row.model_id] = mine.set_index("name")["value"].to_dict()
        ctx = ModelContext(z, row.model_id, int(row.epochs))
        for name, overrides in SETTINGS.items():
            if overrides is None or args.methods == "stored":
                continue
            t = time.perf_counter()
            [result] = family.compute([ctx], family.resolve({**overrides, "density": False}))
            seconds[name] += time.perf_counter() - t
            values[name][row.model_id] = result.metrics
        reference = values["krylov, exact trace (stored)"][row.model_id]
        for split in ("train", "test"):
            key = f"{row.model_id}/{split}"
            if key not in cache:
                n = int(reference[f"hessian_samples_{split}"])
                data = ctx.data
                x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
                cache[key] = dict(zip(("trace", "top_eig"), exact(ctx.model, x[:n], y[:n])))
                cache_path.write_text(json.dumps(cache))
        print(f"[{i + 1}/{len(models)}] width {row.load} {row.model_id} ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\n{len(models)} models of {args.zoo} with width <= {args.max_width}, final epoch; relative errors "
          f"against the exact float64 Hessian; 'in 3 se': |error| <= 3 stored stderr + {FLOAT_FLOOR:g} relative")
    print("| method | split | quantity | median error | max error | within bound | in 3 se | s/model |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [n for n in SETTINGS if values[n]]:
        for split in ("train", "test"):
            for quantity, bound in BOUNDS.items():
                errors, covered = [], []
                for model_id, v in values[name].items():
                    truth = cache[f"{model_id}/{split}"][quantity]
                    error = v[f"hessian_{quantity}_{split}"] - truth
                    stderr = v[f"hessian_{quantity}_stderr_{split}"]
                    errors.append(abs(error) / abs(truth))
                    covered.append(abs(error) <= 3 * stderr + FLOAT_FLOOR * abs(truth))
                errors = np.array(errors)
                per_model = "-" if name.endswith("(stored)") else f"{seconds[name] / len(models):.2f}"
                print(f"| {name} | {split} | {quantity} | {np.median(errors):.2e} | {errors.max():.2e} | "
                      f"{np.mean(errors <= bound):.1%} (<= {bound:.1%}) | {np.mean(covered):.1%} | {per_model} |")


if __name__ == "__main__":
    main()
