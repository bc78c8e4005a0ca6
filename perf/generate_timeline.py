"""Where `zoo generate`'s wall time goes, from the command's start to its exit: the launcher, the
job processes' start-up, the stacks, the end. The figures behind the README's "the rest is fixed
cost".

    python perf/generate_timeline.py [--size 256] [--epochs 20] [--rounds 3]

Runs `python -m zoo generate` of the digits MLP population of `perf/population_speed.py` (`--size`
models) into a fresh root, `--rounds` times, as users run it (local executor, one job per core).
Every Python process of the run (the command, submitit's controller of each job, each job) loads
a `sitecustomize` module written here, found through PYTHONPATH, which writes a timestamp when
the process starts and, through an audit hook (`sys.addaudithook`), when a job begins importing
torch, when it is past that import (its first import of `generators.stacked`, which follows it),
when it puts each stack's `models` pack in place (the last write of a stack stored) and when it
writes its result. Nothing of the project is changed or imported for this; timestamps are the
wall clock (`time.time()`), in seconds from the moment the command is started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from population_speed import write_catalog

HOOK = '''
import json, os, sys, time

_log = os.environ.get("ZOO_PERF_TIMELINE")
if _log:
    def _write(event, **more):
        with open(_log, "a") as f:  # (one short line per write: appended whole)
            f.write(json.dumps(dict(t=time.time(), pid=os.getpid(), event=event, **more)) + "\\n")

    _write("start", argv=sys.argv[1:] if len(sys.argv) > 1 else [], orig=list(getattr(sys, "orig_argv", [])))
    _seen = set()

    def _hook(event, args):
        if event == "import" and args[0] in ("torch", "generators.stacked") and args[0] not in _seen:
            _seen.add(args[0])
            _write("import " + args[0])
        elif event == "os.rename" and isinstance(args[1], (str, bytes, os.PathLike)):
            target = os.fsdecode(args[1])
            if "/tables/models/" in target and os.path.basename(target).startswith("pack-") and target.endswith(".parquet"):
                _write("stack stored")  # (its models pack put in place: the stack's last write)
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if path.endswith("_result.pkl.save_tmp") and path not in _seen:
                _seen.add(path)
                _write("result written")

    sys.addaudithook(_hook)
'''


def role(start: dict) -> str:
    text = " ".join(start["orig"])
    if "submitit.local._local" in text:
        return "controller"
    if "submitit.core._submit" in text:
        return "job"
    return "command" if "generate" in start["argv"] else "other"


def one_run(catalog: Path, zoo: str, tmp: Path, run: int) -> dict:
    hooks, log = tmp / "hooks", tmp / f"timeline-{run}.jsonl"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, ZOO_PERF_TIMELINE=str(log), ZOO_JOBS_DIR=str(tmp / "jobs"),
               PYTHONPATH=os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]))
    start = time.time()
    subprocess.run([sys.executable, "-m", "zoo", "generate", zoo, "--catalog", str(catalog), "--root", str(tmp / f"root-{run}"),
                    "--no-progress"], check=True, capture_output=True, env=env)
    end = time.time()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    roles = {e["pid"]: role(e) for e in events if e["event"] == "start"}
    by_job: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if roles.get(e["pid"]) == "job":
            by_job[e["pid"]][e["event"]].append(e["t"] - start)
    controllers = sorted(e["t"] - start for e in events if e["event"] == "start" and roles[e["pid"]] == "controller")
    command = [e["t"] - start for e in events if e["event"] == "start" and roles[e["pid"]] == "command"]
    jobs = list(by_job.values())
    per_stack = [b - a for job in jobs for a, b in zip([job["import generators.stacked"][0], *job["stack stored"]], job["stack stored"])]
    return {"wall": end - start, "command_python": command[0], "submitted": controllers,
            "job_python": sorted(j["start"][0] for j in jobs), "torch_begins": sorted(j["import torch"][0] for j in jobs),
            "torch_done": sorted(j["import generators.stacked"][0] for j in jobs),
            "stacks": [len(j["stack stored"]) for j in jobs], "first_stored": sorted(j["stack stored"][0] for j in jobs),
            "last_stored": sorted(j["stack stored"][-1] for j in jobs), "results": sorted(j["result written"][0] for j in jobs),
            "per_stack": per_stack}


def span(values: list[float]) -> str:
    return f"{min(values):.2f}" if max(values) - min(values) < 0.005 else f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        catalog = write_catalog(args.size, args.epochs, Path(tmp))
        runs = [one_run(catalog, f"pop{args.size}", Path(tmp), run) for run in range(args.rounds)]
    print(f"`zoo generate` of the {args.size}-model digits MLP population ({args.epochs} epochs), {os.cpu_count()} cores; "
          "seconds from the command's start, each job's figures (min-max over the jobs)")
    print("| milestone | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |")
    print("|---|" + "---|" * len(runs))
    rows = [
        ("the command's Python is running (site loaded)", lambda r: f"{r['command_python']:.2f}"),
        ("jobs submitted (submitit's controller of each job starts)", lambda r: span(r["submitted"])),
        ("each job's Python is running", lambda r: span(r["job_python"])),
        ("each job begins importing torch (submitit, the project's modules before)", lambda r: span(r["torch_begins"])),
        ("each job is past the torch import", lambda r: span(r["torch_done"])),
        ("each job's first stack stored", lambda r: span(r["first_stored"])),
        ("each job's last stack stored", lambda r: span(r["last_stored"])),
        ("each job's result written", lambda r: span(r["results"])),
        ("the command exits", lambda r: f"{r['wall']:.2f}"),
        ("stacks per job", lambda r: "/".join(map(str, r["stacks"]))),
        ("a stack in a job: training + storing, from the import (or the stack before) to its pack",
         lambda r: span(r["per_stack"])),
        ("outside the stacks: the wall time less the longest job's stacks",
         lambda r: f"{r['wall'] - max(b - a for a, b in zip(r['torch_done'], r['last_stored'])):.2f}"),
    ]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(r) for r in runs) + " |")


if __name__ == "__main__":
    main()
