"""Where `zoo generate`'s wall time goes, from the command's start to its exit: the launcher, the
job processes' start-up, the stacks, the end. The figures behind the README's "the rest is fixed
cost".

    python perf/generate_timeline.py [--size 256] [--epochs 20] [--cnn-cell WxB] [--rounds 5]

Runs `python -m zoo generate` of the digits MLP population of `perf/population_speed.py` (`--size`
models; or, with `--cnn-cell`, one of its fmnist-cnn cells) into a fresh root, `--rounds` times,
as users run it (local executor, one job per core).
Every Python process of the run (the command, submitit's controller of each job, each job) loads
a `sitecustomize` module written here, found through PYTHONPATH, which writes a timestamp when
the process starts and, through an audit hook (`sys.addaudithook`), when a job begins importing
torch, when it is past that import (it begins importing `generators.stacked`, which follows it),
when it puts each stack's `models` pack in place (the last write of a stack stored) and when it
begins writing its result (submitit's temporary result file opened). Nothing of the project is changed or imported for this; timestamps are the
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

from population_speed import write_catalog, write_cnn_catalog

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
    by_pid: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        by_pid[e["pid"]][e["event"]].append(e["t"] - start)
    jobs = [{"python": p["start"][0], "torch_begins": first(p["import torch"]), "torch_done": first(p["import generators.stacked"]),
             "stored": p["stack stored"], "result": first(p["result written"])}
            for pid, p in by_pid.items() if roles.get(pid) == "job"]
    return {"wall": end - start, "jobs": jobs,
            "command_python": [p["start"][0] for pid, p in by_pid.items() if roles.get(pid) == "command"],
            "controllers": [p["start"][0] for pid, p in by_pid.items() if roles.get(pid) == "controller"]}


def first(values: list[float]) -> float | None:
    return values[0] if values else None


def span(values) -> str:
    """min-max of the values that are there ("none" when none is)."""
    values = [v for v in values if v is not None]
    if not values:
        return "none"
    return f"{min(values):.2f}" if max(values) - min(values) < 0.005 else f"{min(values):.2f}-{max(values):.2f}"


def per_stack(job: dict) -> list[float]:
    """Each stack's seconds in a job: from the end of the torch import (or the stack before) to
    its pack in place; the first also holds the job's data, the code version and its store."""
    if job["torch_done"] is None:
        return []
    ends = job["stored"]
    return [b - a for a, b in zip([job["torch_done"], *ends], ends)]


def end(run: dict) -> str:
    results = [j["result"] for j in run["jobs"] if j["result"] is not None]
    return f"{run['wall'] - max(results):.2f}" if results else "none"


def outside(run: dict) -> str:
    """The wall time less the longest span, in one job, from the end of its torch import to its
    last stack stored."""
    spans = [j["stored"][-1] - j["torch_done"] for j in run["jobs"] if j["stored"] and j["torch_done"] is not None]
    return f"{run['wall'] - max(spans):.2f}" if spans else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cnn-cell", default=None, metavar="WxB",
                        help="the 64-model fmnist-cnn cell of perf/population_speed.py instead (width x batch, 2 epochs)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cnn_cell:
            width, batch = (int(v) for v in args.cnn_cell.split("x"))
            catalog, zoo = write_cnn_catalog(width, batch, 2, Path(tmp))
            what = f"the 64-model fmnist-cnn cell {args.cnn_cell} (2 epochs)"
        else:
            catalog, zoo = write_catalog(args.size, args.epochs, Path(tmp)), f"pop{args.size}"
            what = f"the {args.size}-model digits MLP population ({args.epochs} epochs)"
        runs = [one_run(catalog, zoo, Path(tmp), run) for run in range(args.rounds)]
    print(f"`zoo generate` of {what}, {os.cpu_count()} cores; seconds from the command's start, min-max over the jobs")
    print("| milestone | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |")
    print("|---|" + "---|" * len(runs))
    rows = [
        ("the command's Python is running (its site loaded)", lambda r: span(r["command_python"])),
        ("each job's submitit controller is running (just after the job's submission)", lambda r: span(r["controllers"])),
        ("each job's Python is running", lambda r: span(j["python"] for j in r["jobs"])),
        ("each job begins importing torch (after submitit and the project's modules)",
         lambda r: span(j["torch_begins"] for j in r["jobs"])),
        ("each job is past the torch import (it begins importing generators.stacked)",
         lambda r: span(j["torch_done"] for j in r["jobs"])),
        ("each job's torch import, seconds", lambda r: span(j["torch_done"] - j["torch_begins"] for j in r["jobs"]
                                                            if j["torch_done"] is not None and j["torch_begins"] is not None)),
        ("each job's first stack stored", lambda r: span(j["stored"][0] if j["stored"] else None for j in r["jobs"])),
        ("each job's last stack stored", lambda r: span(j["stored"][-1] if j["stored"] else None for j in r["jobs"])),
        ("each job begins writing its result", lambda r: span(j["result"] for j in r["jobs"])),
        ("the command exits", lambda r: f"{r['wall']:.2f}"),
        ("its end: the exit less the last job's result (results read, packs merged, the index)", end),
        ("stacks stored per job", lambda r: "/".join(str(len(j["stored"])) for j in r["jobs"])),
        ("a stack in a job, training and storing (from the import, or the stack before, to its pack)",
         lambda r: span(s for j in r["jobs"] for s in per_stack(j))),
        ("outside the stacks: the wall time less the longest job's span from its torch import to its last stack",
         outside),
    ]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(r) for r in runs) + " |")


if __name__ == "__main__":
    main()
