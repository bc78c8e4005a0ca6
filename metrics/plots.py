"""Phase diagrams: the load x temperature heatmap of any stored metric, seed-averaged, with the
phase labels overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from zoo.errors import ZooError

from .phases import PHASES, axis_label, cell_means

LOG_SCALE_PREFIXES = ("hessian_top_eig", "hessian_trace_", "train_loss", "test_loss", "l2_norm", "dist_")


def plot_phase_diagram(handle, zoo_name: str, metric: str, epoch: int, out: Path, phases: bool = False) -> Path:
    """Draw `metric` over the grid of `zoo_name` at `epoch` into `out` (.png or .svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise ZooError(f"--out must end in .png or .svg, not {out.name!r}")
    means = cell_means(handle, zoo_name, epoch)
    if means.empty:
        raise ZooError(f"no metrics stored for zoo {zoo_name!r} at epoch {epoch}; run `zoo metrics {zoo_name}` first")
    known = sorted(c for c in means.columns if c not in ("load_name", "load", "temperature_name", "temperature", "n_models"))
    if metric not in known:
        raise ZooError(f"unknown metric {metric!r} for {zoo_name} at epoch {epoch}; stored: {', '.join(known)}")
    grid = means.pivot(index="load", columns="temperature", values=metric).sort_index().sort_index(axis=1)
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]

    norm, cmap, scale = None, "viridis", ""
    if metric.startswith(("mc_", "barrier_")) and finite.size and finite.min() < 0 < finite.max():
        norm, cmap = TwoSlopeNorm(vcenter=0.0), "RdBu"
    elif finite.size and finite.min() > 0 and (metric.startswith(LOG_SCALE_PREFIXES) or finite.max() / finite.min() > 100):
        norm, scale = LogNorm(vmin=finite.min(), vmax=finite.max()), " (log scale)"

    fig, ax = plt.subplots(figsize=(max(6.5, 1.5 + 0.9 * grid.shape[1]), max(4.0, 1.0 + 0.6 * grid.shape[0])), constrained_layout=True)
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", aspect="auto", cmap=cmap, norm=norm)
    fig.colorbar(image, ax=ax, label=metric + scale)
    ax.set_xticks(range(grid.shape[1]), [axis_label(v) for v in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [axis_label(v) for v in grid.index])
    ax.set_xlabel(f"{means['temperature_name'].iloc[0]} (temperature)")
    ax.set_ylabel(f"{means['load_name'].iloc[0]} (load)")
    ax.set_title(f"{zoo_name}: {metric}, epoch {epoch}, mean over seeds")
    if phases:
        labels = _phase_labels(handle, zoo_name, epoch)
        for i, load in enumerate(grid.index):
            for j, temperature in enumerate(grid.columns):
                text = labels.get((load, temperature), "?")
                ax.text(j, i, text, ha="center", va="center", fontsize=9, fontweight="bold", color="black",
                        bbox=dict(boxstyle="round,pad=0.15", facecolor="white", alpha=0.7, linewidth=0))
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise ZooError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out


def _phase_labels(handle, zoo_name: str, epoch: int) -> dict[tuple[float, float], str]:
    cells = handle.sql("select load, temperature, phase from cells where zoo = ? and epoch = ?", [zoo_name, epoch]) \
        if "cells" in handle.store.tables() else pd.DataFrame()
    if cells.empty:
        raise ZooError(f"no phase labels for {zoo_name} at epoch {epoch}; run `zoo phases {zoo_name}` first")
    return {(l, t): (p if p in PHASES else "?") for l, t, p in cells.itertuples(index=False)}
