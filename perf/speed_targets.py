"""Every speed target of issue #17 in one run: what is asked, what this machine gives, met or not.

    python perf/speed_targets.py [--skip-cnn] [--skip-end-to-end] [--skip-spectral]

Runs the three scripts that measure them, one after another, each in its own process and each
printing its own tables as it goes (so every figure keeps its baseline beside it):

* `perf/population_speed.py`: `zoo generate` as users run it against the best plain PyTorch loop
  (one process per core x 1 thread, or one process x all threads, written there without project
  code), on issue #17's digits MLP populations (64 and 256 models) and on the fmnist-cnn shape;
  then the stacked engine alone and its share of the measured matmul peak;
* `perf/end_to_end.py`: `zoo generate digits-mlp` + `zoo metrics digits-mlp`, all families, in
  a fresh root, wall clock;
* `perf/spectral_vs_weightwatcher.py`: spectral alpha over the 96-model population, ours against
  WeightWatcher's `analyze()` model by model, and the largest alpha difference.

Each writes its figures as JSON (`--json`), and this script ends with one table built from them.
The GPU check is `perf/gpu_check.py`, for a machine that has one. Takes about 15 minutes on the
2-core machine; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("population_speed.py", "end_to_end.py", "spectral_vs_weightwatcher.py")  # (in this order)


def measure(script: str, out: Path, *arguments: str) -> dict | None:
    """Run perf/`script` with `arguments`, its tables going to this terminal; its figures, or
    None when it failed (the others still run, and the table says which is missing)."""
    print(f"\n## python perf/{script} {' '.join(arguments)}".rstrip(), flush=True)
    if subprocess.run([sys.executable, str(HERE / script), *arguments, "--json", str(out)]).returncode != 0 or not out.exists():
        print(f"perf/{script} failed: its figures are missing below", flush=True)
        return None
    return json.loads(out.read_text())


def rows(figures: dict[str, dict | None]) -> list[tuple[str, str, str, str]]:
    """(target, asked, measured, met) from the figures of each script run (None: it failed)."""
    out = [(f"perf/{script}", "-", "failed: see its output above", "not measured")
           for script, measured in figures.items() if measured is None]
    training, end_to_end, spectral = (figures.get(script) for script in SCRIPTS)
    if training:
        for size, asked in (("64", 4.0), ("256", 8.0)):
            if size in training["mlp"]:
                f = training["mlp"][size]
                out.append((f"`zoo generate`, digits MLP, {size} models, vs the best plain loops", f">= {asked:g}x",
                            f"{f['ratio']:.2f}x ({f['zoo_generate']:.2f} vs "
                            f"{max(f['plain_per_core_defaults'], f['plain_per_core_kept'], f['plain_one_process'] or 0):.2f} models/s)",
                            "yes" if f["ratio"] >= asked else "no"))
        for cell, f in training["cnn"].items():
            out.append((f"`zoo generate`, fmnist-cnn shape, width x batch {cell}, vs the plain loops", ">= 3x",
                        f"{f['ratio']:.2f}x ({f['zoo_generate']:.2f} vs {max(f['plain_per_core_defaults'], f['plain_per_core_kept']):.2f} models/s)",
                        "yes" if f["ratio"] >= 3 else "no"))
        for size, f in training["engine_mlp"].items():
            out.append((f"the stacked engine alone, {size} MLPs: its share of the measured matmul peak "
                        f"({training['peak_gflops_per_core']:.1f} GFLOP/s per core)", "stated", f"{f['peak_share']:.1%}", "stated"))
        for cell, f in training["engine_cnn"].items():
            if f["ratio_to_plain"] is not None:
                out.append((f"the stacked engine alone (after start-up), fmnist-cnn {cell}, vs the plain loops", "-",
                            f"{f['ratio_to_plain']:.2f}x", "-"))
    if end_to_end:
        total = end_to_end["generate_s"] + end_to_end["metrics_s"]
        out.append((f"`zoo generate` + `zoo metrics` {end_to_end['zoo']} ({end_to_end['models']} models, all families), fresh root",
                    "<= 4 minutes", f"{end_to_end['generate_s']:.0f} s + {end_to_end['metrics_s']:.0f} s = {total / 60:.1f} minutes",
                    "yes" if total <= 240 else "no"))
    if spectral:
        out.append((f"spectral alpha, {spectral['models']} models, vs WeightWatcher `analyze()` ({spectral['threads']} thread)", ">= 5x",
                    f"{spectral['ratio']:.2f}x ({spectral['ours_ms_per_model']:.2f} vs {spectral['weightwatcher_ms_per_model']:.2f} ms/model)",
                    "yes" if spectral["ratio"] >= 5 else
                    f"no (at most {spectral['ratio_bound_spectra_alone']:.1f}x with a zero-cost fit: the spectra alone)"))
        out.append((f"alpha, ours vs WeightWatcher ({spectral['layers_compared']} layers)", "<= 1e-10",
                    f"{spectral['alpha_max_difference']:.1e}", "yes" if spectral["alpha_max_difference"] <= 1e-10 else "no"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-cnn", action="store_true", help="leave out the fmnist-cnn cells")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--skip-spectral", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        figures = {script: measure(script, out / f"{script}.json", *arguments)
                   for script, arguments in {"population_speed.py": ["--cnn-cells"] if args.skip_cnn else [],
                                             "end_to_end.py": None if args.skip_end_to_end else [],
                                             "spectral_vs_weightwatcher.py": None if args.skip_spectral else []}.items()
                   if arguments is not None}
    print("\n## Issue #17's targets on this machine (one run)\n")
    print("| target | asked | measured | met |")
    print("|---|---|---|---|")
    for row in rows(figures):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
