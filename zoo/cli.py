"""The `zoo` command (also `python -m zoo`). The only place that imports every stage.

    zoo catalog                      the zoos, their grid sizes, how many models are stored
    zoo generate ZOO                 train what the root lacks (local, debug or slurm executor)
    zoo status ZOO                   done, running, failed and missing models, with job ids
    zoo sql "SELECT ..."             read-only SQL over the root
    zoo verify [ZOO]                 check every file and weight hash; quarantine damaged files
    zoo metrics ZOO                  loss-landscape, spectral and weight-space metrics of every model
    zoo phases ZOO                   label each cell of the grid I, II, III, IV-A or IV-B
    zoo plot ZOO --metric M --out F  phase diagram of a metric
    zoo bench TASK [--zoo Z]         score a benchmark task's methods, phase by phase
    zoo leaderboard [--by phase]     the leaderboard from the stored results
    zoo report --out DIR             a static HTML site of the leaderboards and plots
    zoo tasks                        the benchmark tasks and methods

Every command takes --catalog FILE (env ZOO_CATALOG) and --root DIR (env ZOO_ROOT, default
./zoo-data). A bad input prints one line `zoo: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .catalog import load_catalog
from .errors import ZooError, ZooWarning
from .launch import EXECUTORS
from .storage import Store, default_root, pyarrow_without_pandas, safe_name


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--catalog", metavar="FILE", help="catalog file (env ZOO_CATALOG; default: the shipped catalog.yaml)")
    common.add_argument("--root", metavar="DIR|URL", help="zoo root (env ZOO_ROOT; default ./zoo-data); readers also take a "
                        "published zoo: a folder or an http(s)://, s3://, hf:// URL (env ZOO_STORAGE_OPTIONS: its file system's options, JSON)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="Model zoos over phase grids, queried with SQL.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    sub.add_parser("catalog", parents=[common], help="list the zoos of the catalog and what is stored")

    g = sub.add_parser("generate", parents=[common], help="train the models of a zoo that the root lacks")
    g.add_argument("zoo", help="a zoo of the catalog (`zoo catalog` lists them)")
    g.add_argument("--models-per-job", type=int, default=None, metavar="K", help="models trained by one job (a stack stays whole)")
    g.add_argument("--no-stack", action="store_true", help="train one model at a time on the reference path")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="train at most N missing models")
    g.add_argument("--allow-local", action="store_true", help="train a zoo marked `cluster: true` without SLURM")
    _launch_arguments(g)

    st = sub.add_parser("status", parents=[common], help="done, running, failed and missing models of a zoo, with job ids")
    st.add_argument("zoo", help="a zoo of the catalog (`zoo catalog` lists them)")

    m = sub.add_parser("metrics", parents=[common], help="compute and store metrics for every stored model")
    m.add_argument("zoo", help="a zoo of the catalog (`zoo catalog` lists them)")
    m.add_argument("--epoch", default="final", help="final (default), all (every checkpoint) or an epoch number")
    m.add_argument("--only", metavar="FAMILY,...", help="families to compute (default all)")
    _launch_arguments(m)

    p = sub.add_parser("phases", parents=[common], help="label the cells of a zoo's grid with phases")
    p.add_argument("zoo", help="a zoo of the catalog (`zoo catalog` lists them)")
    p.add_argument("--epoch", default="final", help="final (default) or an epoch number")

    pl = sub.add_parser("plot", parents=[common], help="draw the load x temperature diagram of a metric")
    pl.add_argument("zoo", help="a zoo of the catalog (`zoo catalog` lists them)")
    pl.add_argument("--metric", required=True, help="a metric name, as stored in the metrics table")
    pl.add_argument("--epoch", default="final", help="final (default) or an epoch number")
    pl.add_argument("--phases", action="store_true", help="overlay the phase labels")
    pl.add_argument("--out", type=Path, required=True, metavar="FILE.png|FILE.svg", help="the picture to write")

    b = sub.add_parser("bench", parents=[common], help="score a benchmark task's methods on a zoo, phase by phase")
    b.add_argument("task", help="a task name (`zoo tasks` lists them) or a task YAML file")
    b.add_argument("--zoo", help="the zoo to score on (default: the task's zoo)")
    b.add_argument("--method", action="append", metavar="M", help="only this method (repeatable)")
    b.add_argument("--include-path", action="append", default=[], metavar="DIR", help="also find tasks in DIR (repeatable)")
    _launch_arguments(b)  # the (method, unit) pairs run as jobs, like training and metrics
    b.add_argument("--pairs-per-job", type=int, default=None, metavar="K",
                   help="(method, unit) pairs scored by one job (default: one job per local worker; 1 on SLURM)")

    lb = sub.add_parser("leaderboard", parents=[common], help="the leaderboard, from the stored benchmark results")
    lb.add_argument("--task", help="one task (default: all)")
    lb.add_argument("--zoo", help="one zoo (default: all)")
    lb.add_argument("--by", choices=["phase"], help="one ranking per phase")
    lb.add_argument("--format", choices=["table", "markdown", "json", "html"], default="table", help="how to print it (default table)")

    rp = sub.add_parser("report", parents=[common], help="a static HTML site of the benchmark results")
    rp.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write the site into (nothing is written outside it)")

    sub.add_parser("tasks", parents=[common], help="list the benchmark tasks and methods").add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="also find tasks in DIR (repeatable)")

    v = sub.add_parser("verify", parents=[common], help="check every file and weight hash; quarantine damaged files")
    v.add_argument("zoo", nargs="?", help="only this zoo's files (default: the whole root)")
    v.add_argument("--report-only", action="store_true", help="report damage, move nothing")
    v.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="wait at most S seconds for a query or writer that holds the root, then give up (default 60)")

    pub = sub.add_parser("publish", parents=[common], help="write a zoo (or a selection) as a folder of static files to serve or upload")
    pub.add_argument("zoo", help="a zoo stored in the root")
    pub.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new folder to write (must not exist, or be empty)")
    pub.add_argument("--where", metavar="SQL", help="only the models this condition on the models view selects, e.g. \"width >= 128\"")
    pub.add_argument("--epochs", default="final", metavar="final|all|LIST", help="the checkpoints to publish (default final)")
    pub.add_argument("--license", default="cc-by-4.0", help="the license the dataset card declares (default cc-by-4.0)")

    pu = sub.add_parser("pull", parents=[common], help="copy an SQL selection of a published zoo into the root")
    pu.add_argument("source", help="a published zoo: a folder, or an http(s)://, s3://, hf://datasets/ORG/NAME URL")
    pu.add_argument("--where", metavar="SQL", help="the models to pull: a condition on the published models view (default all)")
    pu.add_argument("--epochs", default="all", metavar="final|all|LIST", help="the published checkpoints to pull (default all)")
    pu.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("index", parents=[common], help="rewrite the root's zoo.duckdb (after the root was moved or copied)")

    q = sub.add_parser("sql", parents=[common], help="run a read-only SQL query over the root or a published zoo")
    q.add_argument("query", help="one read-only query (SELECT, WITH, DESCRIBE, ...)")
    q.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table", help="how to print the result (default table)")
    q.add_argument("--out", type=Path, help="write to FILE instead of standard output (required for parquet)")
    q.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop the query after S seconds (default: env ZOO_SQL_TIMEOUT_S, else 300)")
    q.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="DuckDB's memory limit, e.g. 2GB (default: env ZOO_SQL_MEMORY, else a quarter of RAM, at most 4 GB)")
    return parser


def _launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", default="local", metavar="|".join(EXECUTORS),
                        help="local (default: one job per core), debug (in this process) or slurm")
    parser.add_argument("--workers", type=int, default=None, help="concurrent local jobs (default: all cores)")
    parser.add_argument("--jobs-dir", type=Path, default=None, help="submitit's scratch folder (env ZOO_JOBS_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--wait-timeout-min", type=float, default=None, metavar="M",
                        help="give up on (and cancel) a job with no result after M minutes "
                             "(default: 3 x --timeout-min + 10 on SLURM, which allows for requeues; --timeout-min + 10 locally)")
    slurm = parser.add_argument_group("SLURM (override the catalog's `launch:` settings)")
    slurm.add_argument("--partition", help="the SLURM partition")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per job")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per job")
    slurm.add_argument("--mem-gb", type=float, help="memory per job, in GB")
    slurm.add_argument("--timeout-min", type=int, dest="timeout_min", help="a job's time limit, in minutes")
    slurm.add_argument("--signal-delay-s", type=int, dest="signal_delay_s",
                       help="seconds before the time limit at which a job checkpoints and requeues itself (default 90)")
    slurm.add_argument("--account", help="the SLURM account to charge")
    slurm.add_argument("--qos", help="the SLURM quality of service")
    slurm.add_argument("--constraint", help="a SLURM node constraint (features)")
    slurm.add_argument("--array-parallelism", type=int, help="at most this many array tasks at once")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra sbatch argument (repeatable)")


def _launch_options(args, zoo_config, **extra):
    """Launch options from the command line over the zoo's `launch:` settings (zoo_config None: a
    zoo the catalog does not declare, such as a pulled one: the defaults)."""
    from zoo.catalog import Launch
    from zoo.launch import LaunchOptions

    defaults = zoo_config.launch if zoo_config is not None else Launch()
    overrides = {
        key: getattr(args, key)
        for key in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "signal_delay_s", "account", "qos",
                    "constraint", "array_parallelism")
        if getattr(args, key) is not None
    }
    if args.sbatch:
        pairs = [item.split("=", 1) for item in args.sbatch]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise ZooError("--sbatch takes KEY=VALUE")
        overrides["extra"] = {**defaults.extra, **dict(pairs)}
    try:
        launch = Launch.model_validate({**defaults.model_dump(), **overrides})
    except Exception as e:
        raise ZooError(f"bad SLURM option: {str(e).splitlines()[-1].strip()}") from None
    options = LaunchOptions(executor=args.executor, jobs_dir=args.jobs_dir, slurm=launch, **extra)
    if args.workers is not None:
        options.workers = args.workers
    if args.wait_timeout_min is not None:
        if args.wait_timeout_min <= 0:
            raise ZooError("--wait-timeout-min must be positive")
        options.wait_timeout_min = args.wait_timeout_min
    options.check()  # (a bad option is refused before anything is written)
    return options


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run one command; `own_process`: this process ends with it (the `zoo` command itself), so
    the command may set the process up for its own speed (see `cmd_generate`)."""
    args = build_parser().parse_args(argv)
    args.own_process = own_process
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except ZooError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stored = "" if args.command in READERS else "; what was stored is kept, and a rerun goes on from there"
        print(f"zoo: interrupted{stored}", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ZooWarning as one line on stderr; any other warning as Python shows it."""
    if issubclass(category, ZooWarning):
        print(f"zoo: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


READERS = {"publish", "sql", "catalog", "status", "phases", "plot", "leaderboard", "report", "tasks"}  # (write nothing to a root)


def cmd_catalog(args) -> int:
    catalog = load_catalog(args.catalog)
    root = args.root or default_root()
    store = Store(root) if (Path(root) / "tables").is_dir() else None
    header = f"{'zoo':<18} {'arch':<6} {'dataset':<16} {'load':<22} {'temperature':<24} {'seeds':>5} {'models':>6} {'stored':>6}"
    print(header)
    for z in catalog:
        stored = len(store.stored_ids("models", z.name)) if store else 0
        load = f"{z.load.name} x{len(z.load.values)}"
        temperature = f"{z.temperature.name} x{len(z.temperature.values)}"
        print(f"{z.name:<18} {z.architecture['name']:<6} {z.dataset['name']:<16} {load:<22} {temperature:<24} {len(z.seeds):>5} {z.grid_size:>6} {stored:>6}")
    return 0


def cmd_generate(args) -> int:
    from generators.launcher import generate

    if args.own_process:  # (which hands pyarrow no pandas objects, and ends with the command)
        pyarrow_without_pandas()

    zoo_config = load_catalog(args.catalog)[args.zoo]
    if zoo_config.cluster and args.executor != "slurm" and not args.allow_local:
        raise ZooError(f"zoo {zoo_config.name!r} is a cluster job ({zoo_config.grid_size} models of "
                       f"{zoo_config.training.epochs} epochs, GPUs): run it with --executor slurm, "
                       "or pass --allow-local (with --limit N to try a few)")
    options = _launch_options(args, zoo_config, items_per_job=args.models_per_job, limit=args.limit)
    store = Store(args.root or default_root(), create=True)
    report = generate(zoo_config, store, options, progress=not args.no_progress, stacked=not args.no_stack)
    if report.planned == 0:
        print(f"{report.zoo}: all {report.n_models} models already stored in {store.root}", file=sys.stderr)
    else:
        print(
            f"{report.zoo}: trained {report.trained}, skipped {report.skipped}, failed {len(report.failed)} "
            f"of {report.planned} planned in {report.seconds:.1f} s ({report.models_per_second:.2f} models/s); root {store.root}",
            file=sys.stderr,
        )
    for model_id, epoch in list(report.resumed.items())[:5]:
        print(f"  resumed {model_id} after its saved epoch {epoch}", file=sys.stderr)
    for model_id, error in list(report.failed.items())[:5]:
        print(f"  failed {model_id}: {error.splitlines()[0]}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_status(args) -> int:
    from .status import zoo_status

    zoo_config = load_catalog(args.catalog)[args.zoo]
    root = Path(args.root or default_root())
    if not (root / "tables").is_dir():
        raise ZooError(f"no zoo root at {root}")
    status = zoo_status(zoo_config, Store(root))
    print(status.summary())
    for model_id, job in status.running.items():
        print(f"running  {model_id}  {job}")
    for model_id, (job_id, error) in status.failed.items():
        print(f"failed   {model_id}  job {job_id or '?'}  {error}")
    for model_id, job in list(status.missing.items())[:20]:
        print(f"missing  {model_id}  {job or 'never submitted'}")
    if len(status.missing) > 20:
        print(f"missing  ... and {len(status.missing) - 20} more")
    return 0


def cmd_verify(args) -> int:
    from .verify import describe, verify

    store = Store(args.root or default_root())
    if args.zoo:
        safe_name("zoo name", args.zoo)
    if not 0 < args.timeout < float("inf"):
        raise ZooError("--timeout takes a positive number of seconds")
    report = verify(store, args.zoo, repair=not args.report_only, timeout=args.timeout)
    for line in describe(report, store.root):
        print(line)
    return 0 if report.intact else 1


def cmd_sql(args) -> int:
    from .api import Root
    from .pull import storage_options_from_env

    if args.format == "parquet" and not args.out:
        raise ZooError("--format parquet needs --out FILE")
    frame = Root(args.root or default_root(), timeout=args.timeout, memory_limit=args.memory_limit,
                 storage_options=storage_options_from_env()).sql(args.query)
    if args.format == "parquet":
        try:
            frame.to_parquet(args.out, index=False)
        except OSError as e:
            raise ZooError(f"cannot write {args.out}: {e.strerror or e}") from None
        return 0
    if args.format == "csv":
        text = frame.to_csv(index=False)
    elif args.format == "json":
        text = frame.to_json(orient="records", date_format="iso") + "\n"
    else:
        text = (frame.to_string(index=False) if len(frame.columns) else "(no columns)") + "\n"
    if args.out:
        try:
            args.out.write_text(text)
        except OSError as e:
            raise ZooError(f"cannot write {args.out}: {e.strerror or e}") from None
    else:
        sys.stdout.write(text)
    return 0


def cmd_metrics(args) -> int:
    from metrics.runner import run_metrics

    zoo_config = load_catalog(args.catalog)[args.zoo]
    options = _launch_options(args, zoo_config)
    families = [f.strip() for f in args.only.split(",") if f.strip()] if args.only else None
    store = Store(args.root or default_root())
    Store(store.root, create=True)  # tables added since the root was made
    report = run_metrics(zoo_config, store, families, args.epoch, options, progress=not args.no_progress)
    for warning in report.warnings[:20]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(report.warnings) > 20:
        print(f"warning: ... and {len(report.warnings) - 20} more", file=sys.stderr)
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds_by_family.items())
    print(f"{args.zoo}: computed {report.computed}, skipped {report.skipped} (already stored), failed {len(report.failed)}; {timing}", file=sys.stderr)
    for error in report.failed_jobs[:5]:
        print(f"  {error}", file=sys.stderr)
    for line in report.failed[:10]:
        print(f"  failed (computed again on the next run): {line}", file=sys.stderr)
    if len(report.failed) > 10:
        print(f"  ... and {len(report.failed) - 10} more failed units (the metric_failures table)", file=sys.stderr)
    return 1 if report.failed_jobs or report.failed else 0


def cmd_phases(args) -> int:
    from metrics.phases import PhaseRules, label_cells, phase_grid, store_cells

    from .api import Root

    zoo_config = load_catalog(args.catalog)[args.zoo]
    [epoch] = zoo_config.select_epochs(args.epoch, allow_all=False)
    rules = PhaseRules.from_catalog(zoo_config.metrics)
    handle = Root(args.root)
    Store(handle.root, create=True)  # a writable root, before the work
    cells = label_cells(handle, zoo_config.name, epoch, rules)
    store_cells(handle.store, cells)
    grid = phase_grid(cells)
    print(f"{zoo_config.name}, epoch {epoch}: rows {zoo_config.load.name} (load), columns {zoo_config.temperature.name} (temperature)")
    print(grid.to_string())
    counts = cells["phase"].fillna("?").value_counts()
    print("cells per phase: " + ", ".join(f"{p} {n}" for p, n in counts.items()))
    return 0


def cmd_plot(args) -> int:
    from metrics.plots import plot_phase_diagram

    from .api import Root

    zoo_config = load_catalog(args.catalog)[args.zoo]
    [epoch] = zoo_config.select_epochs(args.epoch, allow_all=False)
    out = plot_phase_diagram(Root(args.root), zoo_config.name, args.metric, epoch, args.out, phases=args.phases)
    print(out)
    return 0


def cmd_bench(args) -> int:
    from benchmarks import find_task, run_task

    from .api import Root

    task = find_task(args.task, args.include_path)
    zoo_name = args.zoo or task.config.zoo
    if not zoo_name:
        raise ZooError(f"task {task.name!r} names no zoo: pass --zoo")
    catalog = load_catalog(args.catalog)
    options = _launch_options(args, catalog.zoos.get(zoo_name), items_per_job=args.pairs_per_job)
    store = Store(args.root or default_root())
    Store(store.root, create=True)  # tables added since the root was made
    progress = None if args.no_progress else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    report = run_task(Root(store.root, recover=True), task, zoo_name, args.method, progress=progress,
                      options=None if args.executor == "debug" else options)
    print(f"{task.name} on {zoo_name}: computed {report.computed}, reused {report.reused} (already stored), "
          f"failed {len(report.failed)}", file=sys.stderr)
    for line in report.failed[:10]:
        print(f"  failed: {line}", file=sys.stderr)
    return print_leaderboard(store.root, task.name, zoo_name, by="phase", format="table")


def cmd_leaderboard(args) -> int:
    return print_leaderboard(args.root, args.task, args.zoo, args.by, args.format)


def print_leaderboard(root, task: str | None, zoo_name: str | None, by: str | None, format: str) -> int:
    from benchmarks import leaderboard, render

    from .api import Root

    print(render(leaderboard(Root(root), task, by, zoo_name), format))
    return 0


def cmd_report(args) -> int:
    from benchmarks.report import write_report

    from .api import Root

    print(write_report(Root(args.root), args.out))
    return 0


def cmd_tasks(args) -> int:
    from benchmarks import METHODS, discover_tasks, load_task

    for name, path in discover_tasks(args.include_path).items():
        task = load_task(path)
        print(f"{name} (v{task.config.version}, protocol {task.protocol.name}, per {task.protocol.unit}): "
              f"{', '.join(dict.fromkeys(c.method.name for c in task.calls))}\n    {path}")
    print("methods: " + ", ".join(f"{m.name} ({m.kind})" for m in sorted(METHODS.values(), key=lambda m: (m.kind, m.name))))
    return 0


def cmd_publish(args) -> int:
    from .api import Root
    from .publish import publish

    z = Root(args.root or default_root())
    config = load_catalog(args.catalog).zoos.get(args.zoo)  # (a zoo stored from another catalog has no entry here)
    entry = config.model_dump(mode="json", exclude={"name"}) if config is not None else None
    print(publish(z, args.zoo, args.out, entry, args.where, args.epochs, args.license).summary())
    return 0


def cmd_pull(args) -> int:
    from .api import Root
    from .pull import pull, storage_options_from_env

    with warnings.catch_warnings():  # (the pull names every refused file itself)
        warnings.simplefilter("ignore", ZooWarning)
        source = Root(args.source, storage_options=storage_options_from_env())
    store = Store(args.root or default_root(), create=True)
    report = pull(source, args.where, store, args.epochs, progress=not args.no_progress)
    for line in report.refused[:20]:
        print(f"zoo: refused {line}", file=sys.stderr)
    print(report.summary())
    return 1 if report.refused else 0


def cmd_index(args) -> int:
    store = Store(args.root or default_root())
    print(f"wrote {store.write_index()}")
    return 0


COMMANDS = {
    "publish": cmd_publish,
    "pull": cmd_pull,
    "index": cmd_index,
    "bench": cmd_bench,
    "leaderboard": cmd_leaderboard,
    "report": cmd_report,
    "tasks": cmd_tasks,
    "catalog": cmd_catalog,
    "generate": cmd_generate,
    "sql": cmd_sql,
    "metrics": cmd_metrics,
    "status": cmd_status,
    "verify": cmd_verify,
    "phases": cmd_phases,
    "plot": cmd_plot,
}
