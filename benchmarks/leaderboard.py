"""Leaderboards, rebuilt from the stored `benchmark_results` alone (nothing is recomputed).

One row per (task, zoo, method with its parameters[, phase]); one column per metric, the mean
over the units (cells or models) that succeeded; `units` counts them and `failed` the units
whose method raised. Rows are ranked by the task's first metric, in the direction its protocol
declares (stored with every result as `higher_is_better`). Only each task's latest version is
shown.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from zoo.errors import ZooError

FORMATS = ("table", "markdown", "json", "html")


def results(z, task: str | None = None, zoo: str | None = None) -> pd.DataFrame:
    """The stored result rows of each task's latest version (all tasks when `task` is None)."""
    if "benchmark_results" not in z.store.tables():
        raise ZooError(f"no benchmark results in {z.root}; run `zoo bench TASK` first")
    where, params = ["task_version = (select max(task_version) from benchmark_results r where r.task = b.task)"], []
    if task:
        where.append("task = ?")
        params.append(task)
    if zoo:
        where.append("zoo = ?")
        params.append(zoo)
    frame = z.sql(f"select * from benchmark_results b where {' and '.join(where)}", params)
    if frame.empty:
        raise ZooError(f"no benchmark results for {'task ' + repr(task) if task else 'any task'}"
                       f"{' on zoo ' + repr(zoo) if zoo else ''} in {z.root}")
    return frame


def leaderboard(z, task: str | None = None, by: str | None = None, zoo: str | None = None) -> pd.DataFrame:
    frame = results(z, task, zoo)
    frame["label"] = method_labels(frame)
    frame["phase"] = frame["phase"].fillna("all")
    keys = ["task", "zoo", "label"] + (["phase"] if by == "phase" else [])
    if by not in (None, "phase"):
        raise ZooError(f"--by takes 'phase', got {by!r}")
    ok = frame[frame["status"] == "ok"]
    if by != "phase":  # a population task's per-phase rows are not units of the whole board
        population = ok["unit"] == "population"
        ok = ok[~population | (ok["phase"] == "all")]
    everything = frame[keys].drop_duplicates().set_index(keys)
    means = ok.pivot_table(index=keys, columns="metric", values="value", aggfunc="mean", dropna=False)
    units = ok.groupby(keys)["unit"].nunique().rename("units")
    failed = frame[frame["status"] == "failed"].groupby(keys)["unit"].nunique().rename("failed")
    board = everything.join(means, how="left").join(units, how="left").join(failed, how="left").reset_index()
    board["failed"] = board["failed"].fillna(0).astype(int)
    board["units"] = board["units"].fillna(0).astype(int)
    board = board.rename(columns={"label": "method"})
    order = []
    for (task_name, *_), group in board.groupby(["task", "zoo"] + (["phase"] if by == "phase" else []), sort=True):
        first, higher = _ranking_metric(frame[frame["task"] == task_name])
        group = group.sort_values(first, ascending=not higher, na_position="last") if first in group else group
        group = group.assign(rank=np.arange(1, len(group) + 1))
        order.append(group)
    board = pd.concat(order, ignore_index=True)
    metrics = [c for c in board.columns if c not in {"task", "zoo", "method", "phase", "units", "failed", "rank"}]
    metrics = [m for m in metric_order(frame) if m in metrics]
    front = ["task", "zoo"] + (["phase"] if by == "phase" else []) + ["rank", "method"]
    board = board[front + metrics + ["units", "failed"]]
    return board.dropna(axis=1, how="all")


def render(board: pd.DataFrame, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ZooError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return board.to_json(orient="records", indent=2, double_precision=6)
    if fmt == "html":
        return board.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="", classes="leaderboard", border=0)
    if fmt == "markdown":
        cells = [[_cell(v) for v in row] for row in board.itertuples(index=False)]
        lines = ["| " + " | ".join(board.columns) + " |", "|" + "---|" * len(board.columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
        return board.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")


def method_labels(frame: pd.DataFrame) -> list[str]:
    """Each row's method, with the parameters that tell apart its task's calls of that method
    (a sweep's values; the full parameters are in the `parameters` column of the results)."""
    varying = {key: varying_parameters(group["parameters"]) for key, group in frame.groupby(["task", "method"])}
    labels = []
    for task, method, parameters in zip(frame["task"], frame["method"], frame["parameters"]):
        values = json.loads(parameters) if parameters else {}
        shown = [f"{k}={values.get(k)}" for k in varying[(task, method)]]
        labels.append(method + (f"({', '.join(shown)})" if shown else ""))
    return labels


def varying_parameters(parameters: pd.Series) -> list[str]:
    """The parameter names whose values differ among these calls (JSON parameter strings)."""
    values = [json.loads(p) if p else {} for p in parameters.drop_duplicates()]
    keys = list(dict.fromkeys(k for v in values for k in v))
    return [k for k in keys if len({json.dumps(v.get(k)) for v in values}) > 1]


def _ranking_metric(frame: pd.DataFrame) -> tuple[str, bool]:
    """The task's first metric (in the order results were stored) and its direction."""
    first = metric_order(frame)[0]
    higher = bool(frame.loc[frame["metric"] == first, "higher_is_better"].iloc[0])
    return first, higher


def metric_order(frame: pd.DataFrame) -> list[str]:
    """The tasks' metrics in their YAML order (stored in each row's settings)."""
    order = []
    for settings in frame["settings"].drop_duplicates():
        order += json.loads(settings).get("metrics", [])
    return list(dict.fromkeys(order + list(frame["metric"])))


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4f}"
    return str(value)
