"""Phase labels of the cells of a zoo's grid, by explicit and configurable rules.

The taxonomy (Yang et al. 2021; the 2025 phase-zoo paper) is qualitative:

| phase | train loss | mc            | CKA   |
|-------|------------|---------------|-------|
| I     | high       | < 0 (barrier) |       |
| II    | high       | > 0           |       |
| III   | small      | < 0           |       |
| IV-A  | small      | ~ 0           | small |
| IV-B  | small      | ~ 0           | large |

No paper publishes thresholds, so the rule here is explicit (settings under
`metrics: {phases: {...}}` in catalog.yaml, defaults from the digits experiment in the notes):

    high loss  :=  mean train loss over seeds  >  loss_threshold            (default 0.5)
    high loss  ->  II if mc > +mc_tolerance else I                          (default 0.05)
    small loss ->  III if mc < -mc_tolerance,
                   else IV-B if CKA > cka_threshold else IV-A               (default 0.9)

mc is the seed-pair mean of `mc_metric` (default `mc_linear_train_error`: train *error*, since mc
on train loss is negative almost everywhere) and CKA the pair mean of `cka_metric` (default
`cka_logits`). The Hessian is stored beside each label but is not a criterion: under a fixed
epoch budget it did not separate the phases as the taxonomy assumes (near-initialisation and
dead networks have high loss and a flat Hessian).

Each label carries `phase_margin`, the smallest distance of the cell to a boundary that its
decision crossed, in units of the threshold's scale (|log(loss / loss_threshold)|,
|mc -+ mc_tolerance| / mc_tolerance, |CKA - cka_threshold| / (1 - cka_threshold)): below 1 the
cell sits near a boundary. `phase_agreement` is the fraction of its seed pairs that, labelled
alone, get the cell's label.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field, ValidationError

from zoo.catalog import first_error
from zoo.errors import ZooError
from zoo.rows import cells_part_key
from zoo.schemas import SCHEMAS
from zoo.settings import Settings

PHASES = ("I", "II", "III", "IV-A", "IV-B")


class PhaseRules(Settings):
    loss_metric: str = "train_loss"
    loss_threshold: float = Field(0.5, gt=0)
    mc_metric: str = "mc_linear_train_error"
    mc_tolerance: float = Field(0.05, gt=0)
    cka_metric: str = "cka_logits"
    cka_threshold: float = Field(0.9, gt=0, lt=1)

    @classmethod
    def from_catalog(cls, metrics_settings: dict) -> "PhaseRules":
        try:
            return cls(**(metrics_settings.get("phases") or {}))
        except ValidationError as e:
            field, message = first_error(e, "metrics.phases")
            raise ZooError(f"{field}: {message}") from None


def label(loss: float, mc: float, cka: float, rules: PhaseRules) -> tuple[str | None, float]:
    """(phase, margin) of one cell or pair; (None, nan) when a needed value is missing."""
    if not (np.isfinite(loss) and np.isfinite(mc)) or loss <= 0:
        return None, math.nan
    loss_margin = abs(math.log(loss / rules.loss_threshold))
    tol = rules.mc_tolerance
    if loss > rules.loss_threshold:
        return ("II" if mc > tol else "I"), min(loss_margin, abs(mc - tol) / tol)
    if mc < -tol:
        return "III", min(loss_margin, abs(mc + tol) / tol)
    if not np.isfinite(cka):
        return None, math.nan
    cka_margin = abs(cka - rules.cka_threshold) / (1 - rules.cka_threshold)
    return ("IV-B" if cka > rules.cka_threshold else "IV-A"), min(loss_margin, abs(mc + tol) / tol, cka_margin)


def cell_means(handle, zoo_name: str, epoch: int) -> pd.DataFrame:
    """Seed-averaged metrics per cell (finite values only): one row per (load, temperature), one
    column per model metric (mean over seeds) and pair metric (mean over seed pairs)."""
    model_rows = handle.sql(
        """select m.load_name, m.load, m.temperature_name, m.temperature, x.name,
                  avg(x.value) filter (where isfinite(x.value)) as value, count(distinct m.model_id) as n
           from metrics x join models m using (model_id)
           where x.zoo = ? and x.epoch = ? group by all""",
        [zoo_name, epoch],
    )
    pair_rows = handle.sql(
        """select m.load_name, m.load, m.temperature_name, m.temperature, p.name,
                  avg(p.value) filter (where isfinite(p.value)) as value, count(*) as n
           from pair_metrics p join models m on m.model_id = p.model_a
           where p.zoo = ? and p.epoch = ? group by all""",
        [zoo_name, epoch],
    )
    rows = pd.concat([model_rows, pair_rows], ignore_index=True)
    if rows.empty:
        return rows
    keys = ["load_name", "load", "temperature_name", "temperature"]
    wide = rows.pivot_table(index=keys, columns="name", values="value", aggfunc="first", dropna=False).reset_index()
    wide.columns.name = None
    counts = handle.sql("select load, temperature, count(*) as n_models from models where zoo = ? group by all", [zoo_name])
    return wide.merge(counts, on=["load", "temperature"], how="left")


def pair_table(handle, zoo_name: str, epoch: int, names: list[str]) -> pd.DataFrame:
    """Pair metrics `names` of every seed pair, wide, with the cell and the pair's mean loss."""
    return handle.sql(
        """select m.load, m.temperature, p.model_a, p.model_b, p.name, p.value
           from pair_metrics p join models m on m.model_id = p.model_a
           where p.zoo = ? and p.epoch = ? and p.name in (select unnest(?))""",
        [zoo_name, epoch, names],
    ).pivot_table(index=["load", "temperature", "model_a", "model_b"], columns="name", values="value", aggfunc="first").reset_index()


def label_cells(handle, zoo_name: str, epoch: int, rules: PhaseRules) -> pd.DataFrame:
    """The cells table for one epoch: seed-averaged metrics, phase, margin and agreement."""
    means = cell_means(handle, zoo_name, epoch)
    if means.empty:
        raise ZooError(f"no metrics stored for zoo {zoo_name!r} at epoch {epoch}; run `zoo metrics {zoo_name}` first")
    needed = [rules.loss_metric, rules.mc_metric, rules.cka_metric]
    missing = [n for n in needed if n not in means.columns]
    if missing:
        raise ZooError(
            f"phases need {missing[0]!r}, which is not stored for {zoo_name} at epoch {epoch}; "
            f"run `zoo metrics {zoo_name}` with the performance, connectivity and cka families"
        )
    labels = [label(r[rules.loss_metric], r[rules.mc_metric], r[rules.cka_metric], rules) for _, r in means.iterrows()]
    means["phase"] = [p for p, _ in labels]
    means["phase_margin"] = [m for _, m in labels]

    losses = handle.sql("select model_id, value from metrics where zoo = ? and epoch = ? and name = ?",
                        [zoo_name, epoch, rules.loss_metric]).set_index("model_id")["value"]
    pairs = pair_table(handle, zoo_name, epoch, [rules.mc_metric, rules.cka_metric])
    agreement = {}
    for (load, temperature), group in pairs.groupby(["load", "temperature"]):
        cell_phase = means.loc[(means["load"] == load) & (means["temperature"] == temperature), "phase"].iloc[0]
        votes = [
            label(float(np.nanmean([losses.get(r.model_a, np.nan), losses.get(r.model_b, np.nan)])),
                  r[rules.mc_metric], r.get(rules.cka_metric, np.nan), rules)[0] == cell_phase
            for _, r in group.iterrows()
        ]
        agreement[(load, temperature)] = float(np.mean(votes)) if votes else math.nan
    means["phase_agreement"] = [agreement.get((l, t), math.nan) for l, t in zip(means["load"], means["temperature"])]
    n_pairs = pairs.groupby(["load", "temperature"]).size() if len(pairs) else pd.Series(dtype=int)
    means["n_pairs"] = [int(n_pairs.get((l, t), 0)) for l, t in zip(means["load"], means["temperature"])]
    means.insert(0, "epoch", epoch)
    means.insert(0, "zoo", zoo_name)
    means["rules"] = rules.model_dump_json()
    return means.sort_values(["load", "temperature"]).reset_index(drop=True)


def store_cells(store, cells: pd.DataFrame) -> None:
    """Write the cells of one (zoo, epoch) as one part (replacing an earlier labelling)."""
    zoo_name, epoch = cells["zoo"].iloc[0], int(cells["epoch"].iloc[0])
    base = SCHEMAS["cells"]
    extra = [c for c in cells.columns if c not in base.names]
    schema = pa.schema(list(base) + [pa.field(c, pa.float64()) for c in extra])
    frame = cells[[*base.names, *extra]].copy()
    for column in extra:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    store.write_part("cells", zoo_name, cells_part_key(epoch), table)
    store.write_index()


def phase_grid(cells: pd.DataFrame) -> pd.DataFrame:
    """Labels as a load x temperature table (for printing)."""
    grid = cells.pivot(index="load", columns="temperature", values="phase")
    grid.index = [axis_label(v) for v in grid.index]
    grid.columns = [axis_label(v) for v in grid.columns]
    return grid.fillna("?")


def axis_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
