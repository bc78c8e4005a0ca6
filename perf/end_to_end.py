"""End to end: `zoo generate ZOO` then `zoo metrics ZOO` (all families, final epoch) in a fresh
root, as a user runs them, timed by wall clock; then the rows they stored are counted.

    python perf/end_to_end.py [--zoo digits-mlp] [--root DIR] [--json FILE]

Both commands run as subprocesses with the default local executor (all cores), exactly the
README's first command plus `zoo metrics`. The target on the 2-core machine (issue #17): <= 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import zoo


def run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zoo", *args, "--no-progress"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="digits-mlp")
    parser.add_argument("--root", type=Path, default=None, help="a fresh root (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file (perf/speed_targets.py reads it)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "root"
        if root.exists() and any(root.iterdir()):
            sys.exit(f"{root} is not empty: the end-to-end time is for a fresh root")
        generate = run("generate", args.zoo, "--root", str(root))
        metrics = run("metrics", args.zoo, "--root", str(root))
        z = zoo.open(root)
        models = int(z.sql("select count(*) from models where zoo = ?", [args.zoo]).iloc[0, 0])
        rows = int(z.sql("select count(*) from metrics where zoo = ?", [args.zoo]).iloc[0, 0])
        print(f"{date.today()}  {cpu}  {len(__import__('os').sched_getaffinity(0))} cores")
        print(f"{args.zoo}: {models} models, {rows} metric rows")
        print(f"zoo generate {generate:.0f} s + zoo metrics {metrics:.0f} s = {(generate + metrics) / 60:.1f} minutes")
        if args.json:
            args.json.write_text(json.dumps({"zoo": args.zoo, "models": models, "metric_rows": rows,
                                             "generate_s": generate, "metrics_s": metrics}, indent=1))


if __name__ == "__main__":
    main()
