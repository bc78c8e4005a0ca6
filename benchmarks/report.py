"""`zoo report --out DIR`: a static HTML site of the stored benchmark results.

For every task: its leaderboard (overall and per phase), a method x phase heatmap of its first
metric, the phase diagram (load x temperature) of the leading method's first metric with the
phase labels, and, where a method was swept over a numeric parameter (pruning's sparsity,
interpolation's alpha), the first metric against that parameter per method. Built from the
`benchmark_results` table alone; plots are PNG files beside index.html, so the folder can be
copied anywhere or served as it is.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from metrics.phases import axis_label
from zoo.errors import ZooError

from .leaderboard import method_labels, metric_order, leaderboard, render, results, varying_parameters

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table.leaderboard { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
table.leaderboard th, table.leaderboard td { padding: 0.25em 0.6em; border-bottom: 1px solid #eee; text-align: right; }
table.leaderboard th { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.meta { color: #666; font-size: 0.9em; }
"""


def write_report(z, out: str | Path) -> Path:
    """Write DIR/index.html and DIR/img/*.png; returns the index path."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    try:
        (out / "img").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZooError(f"cannot write the report to {out}: {e.strerror or e}") from None
    _inside(out, out / "img")
    frame = results(z)
    frame = frame[frame["status"] == "ok"].copy()
    frame["label"] = method_labels(frame)
    frame["phase"] = frame["phase"].fillna("all")
    sections, contents = [], []
    for (task, zoo_name), rows in frame.groupby(["task", "zoo"], sort=True):
        sections.append(_section(z, task, zoo_name, rows, out))
        contents.append(f"<li><a href='#{_slug(task, zoo_name)}'>{html.escape(task)} on {html.escape(zoo_name)}</a></li>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Zoo benchmarks</title>"
            f"<style>{STYLE}</style></head><body><h1>Zoo benchmarks</h1>"
            f"<p class='meta'>{html.escape(str(z.root))} &middot; built {stamp} from the stored results</p>"
            + "<ul>" + "".join(contents) + "</ul>" + "".join(sections) + "</body></html>")
    index = _inside(out, out / "index.html")
    index.write_text(page)
    return index


def _slug(*names: str) -> str:
    """A file name (and HTML id) for names read from a zoo, which may hold anything ('../x',
    '/etc/x', quotes): their letters, digits, '_' and '-', then a short hash of the raw names, so
    two names never share one."""
    raw = "\0".join(names)
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(names)).strip("-")[:60]
    return f"{readable}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"


def _inside(out: Path, path: Path) -> Path:
    """`path`, after checking that it resolves inside the report folder (no link leads out)."""
    if not path.resolve().is_relative_to(out.resolve()):
        raise ZooError(f"refused to write {path}: it resolves outside the report folder {out}")
    return path


def _section(z, task: str, zoo_name: str, rows: pd.DataFrame, out: Path) -> str:
    first = metric_order(rows)[0]
    higher = bool(rows.loc[rows["metric"] == first, "higher_is_better"].iloc[0])
    slug = _slug(task, zoo_name)  # (names from the zoo never become path components as they are)
    parts = [f"<h2 id='{slug}'>{html.escape(task)} on {html.escape(zoo_name)}</h2>",
             f"<p class='meta'>ranked by {html.escape(first)} ({'higher' if higher else 'lower'} is better); "
             f"version {int(rows['task_version'].iloc[0])}; code {html.escape(str(rows['code_version'].iloc[0]))}</p>"]
    named = ["task", "zoo"]  # (the heading names them)
    parts.append(render(leaderboard(z, task, None, zoo_name).drop(columns=named), "html"))
    parts.append("<h3>By phase</h3>" + render(leaderboard(z, task, "phase", zoo_name).drop(columns=named), "html"))

    def png(kind: str) -> Path:
        return _inside(out, out / "img" / f"{slug}-{kind}.png")

    images = [_heatmap(rows, first, png("methods-by-phase"), task),
              _phase_diagram(z, rows, first, higher, png("phase-diagram"), task, zoo_name),
              _sweeps(rows, first, png("sweeps"), task)]
    for image in images:
        if image is not None:
            name, caption = image
            parts.append(f"<figure><img src='img/{html.escape(name)}' alt='{html.escape(caption)}' "
                         f"onerror=\"console.error('missing image: ' + this.src)\"><figcaption>{html.escape(caption)}</figcaption></figure>")
    return "".join(parts)


def _heatmap(rows: pd.DataFrame, metric: str, path: Path, task: str):
    import matplotlib.pyplot as plt

    data = rows[rows["metric"] == metric].pivot_table(index="label", columns="phase", values="value", aggfunc="mean")
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 + 1.1 * data.shape[1]), max(2.5, 0.9 + 0.35 * data.shape[0])), constrained_layout=True)
    image = ax.imshow(data.to_numpy(float), aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(data.shape[1]), list(data.columns))
    ax.set_yticks(range(data.shape[0]), list(data.index), fontsize=8)
    values = data.to_numpy(float)
    middle = np.nanmean([np.nanmin(values), np.nanmax(values)]) if np.isfinite(values).any() else 0.0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color="black" if value > middle else "white")
    ax.set_title(f"{task}: {metric}, method x phase")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name, f"{task}: mean {metric} of each method in each phase"


def _phase_diagram(z, rows: pd.DataFrame, metric: str, higher: bool, path: Path, task: str, zoo_name: str):
    import matplotlib.pyplot as plt

    cells = rows[(rows["metric"] == metric) & rows["load"].notna() & rows["temperature"].notna()]
    if cells.empty:
        return None
    means = cells.groupby("label")["value"].mean()
    best = means.idxmax() if higher else means.idxmin()
    grid = cells[cells["label"] == best].pivot_table(index="load", columns="temperature", values="value", aggfunc="mean")
    phases = cells.drop_duplicates(["load", "temperature"]).set_index(["load", "temperature"])["phase"]
    fig, ax = plt.subplots(figsize=(max(5, 1.5 + 0.9 * grid.shape[1]), max(3.5, 1.0 + 0.55 * grid.shape[0])), constrained_layout=True)
    image = ax.imshow(grid.to_numpy(float), origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(grid.shape[1]), [axis_label(v) for v in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [axis_label(v) for v in grid.index])
    for i, load in enumerate(grid.index):
        for j, temperature in enumerate(grid.columns):
            ax.text(j, i, str(phases.get((load, temperature), "?")), ha="center", va="center", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", alpha=0.7, linewidth=0))
    names = z.sql("select any_value(load_name) as l, any_value(temperature_name) as t from models where zoo = ?", [zoo_name])
    ax.set_xlabel(f"{names['t'].iloc[0]} (temperature)")
    ax.set_ylabel(f"{names['l'].iloc[0]} (load)")
    ax.set_title(f"{task}: {metric} of {best}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name, f"{task}: {metric} of the leading method ({best}) over the grid, phase labels overlaid"


def _sweeps(rows: pd.DataFrame, metric: str, path: Path, task: str):
    """First metric against each method's swept numeric parameter, one line per method (and
    phase, dashed per phase)."""
    import matplotlib.pyplot as plt

    lines = []
    for method, group in rows[rows["metric"] == metric].groupby("method"):
        values = [json.loads(p) for p in group["parameters"].drop_duplicates()]
        keys = [k for k in varying_parameters(group["parameters"]) if all(isinstance(v.get(k), (int, float)) for v in values)]
        if len(keys) != 1:
            continue
        key = keys[0]
        group = group.assign(x=[json.loads(p)[key] for p in group["parameters"]])
        lines.append((method, key, group))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for method, key, group in lines:
        overall = group.groupby("x")["value"].mean()
        (line,) = ax.plot(overall.index, overall.to_numpy(), marker="o", label=f"{method} (all)")
        for phase, part in group.groupby("phase"):
            if phase in ("all", "unlabelled") or part["x"].nunique() < 2:
                continue
            curve = part.groupby("x")["value"].mean()
            ax.plot(curve.index, curve.to_numpy(), linestyle="--", color=line.get_color(), alpha=0.5, linewidth=1)
    ax.set_xlabel(", ".join(dict.fromkeys(k for _, k, _ in lines)))
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.set_title(f"{task}: {metric} against the swept parameter (dashed: per phase)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name, f"{task}: {metric} against the swept parameter"

