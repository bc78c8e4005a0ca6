"""A model's training state, saved at epoch ends so a killed or requeued run resumes mid-model.

A paper-scale model trains for hours; a job that SLURM stops at its time limit, or a node that
fails, must not lose them. Every `ZOO_RESUME_EVERY_S` seconds (default 300; 0: every epoch) the
reference path (`training.train`) saves, at the end of an epoch, everything the rest of the run
depends on: the model's parameters and buffers, the optimizer's state, the learning-rate
schedule's counters, the data-order and augmentation generators (and the data stream's leftover
indices), and the curves and checkpoints kept so far. A rerun of the same model loads it and
continues at the next epoch, and ends with exactly the bits of an uninterrupted run.

The file is `<root>/resume/<zoo>/<model id>.safetensors`: tensors in safetensors, everything
else as JSON in its metadata, never pickle. It is written under a temporary name and renamed,
carries a sha256 of its tensors, and is used only by the same model spec, code version and torch
version (anything else starts the model over, with a warning). It is removed once the model is
stored. Stacks of small models (`stacked.py`) take minutes and start over instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

import zoo
from zoo.catalog import ModelSpec
from zoo.errors import ZooError
from zoo.integrity import write_atomically, write_error

if TYPE_CHECKING:  # torch is imported where a state is saved or read: `zoo generate`'s planning
    import torch   # process imports this module and needs no torch (2 s of its start-up)

FORMAT = "zoo-resume-1"
DEFAULT_EVERY_S = 300.0


def save_interval_s() -> float:
    """Seconds between saves: $ZOO_RESUME_EVERY_S, default 300 (0: at every epoch end)."""
    text = os.environ.get("ZOO_RESUME_EVERY_S")
    if text is None:
        return DEFAULT_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ZooError(f"ZOO_RESUME_EVERY_S must be a number of seconds >= 0, got {text!r}")
    return value


@dataclass
class TrainingState:
    """What a run has done up to the end of `epoch` (see the module's docstring)."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    schedule: dict
    generators: dict[str, torch.Tensor]  # name -> torch.Generator state
    buffers: dict[str, torch.Tensor]  # the data stream's leftover indices, ...
    curves: list[dict]
    checkpoints: dict[int, np.ndarray]
    seconds: float  # training time spent so far


def _identity(spec: ModelSpec) -> dict[str, str]:
    import torch

    return {"spec": hashlib.sha256(spec.to_json().encode()).hexdigest(), "code": zoo.code_version(), "torch": torch.__version__}


# JSON keeps floats exact (shortest round-trip repr); these two markers keep what it would change.
def _to_json(value):
    if isinstance(value, Counter):  # MultiStepLR's milestones
        return {"__counter__": [[_to_json(k), n] for k, n in value.items()]}
    if isinstance(value, tuple):  # Adam's betas
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"__counter__"}:
            return Counter({k: n for k, n in value["__counter__"]})
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def save_state(path: Path, spec: ModelSpec, state: TrainingState) -> None:
    """Write `state` to `path` atomically (an interrupted save leaves the previous one)."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.model.items():
        tensors[f"model/{name}"] = t.detach().cpu().contiguous()
    optimizer_plain = {"param_groups": state.optimizer["param_groups"], "state": {}}
    for index, entries in state.optimizer["state"].items():
        plain = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain[key] = value
        optimizer_plain["state"][str(index)] = plain
    for name, t in state.generators.items():
        tensors[f"generator/{name}"] = t.contiguous()
    for name, t in state.buffers.items():
        tensors[f"buffer/{name}"] = t.contiguous()
    for epoch, flat in state.checkpoints.items():
        tensors[f"checkpoint/{epoch}"] = torch.from_numpy(np.ascontiguousarray(flat))
    metadata = {
        "format": FORMAT, **_identity(spec), "epoch": str(state.epoch), "seconds": repr(state.seconds),
        "optimizer": json.dumps(_to_json(optimizer_plain)), "schedule": json.dumps(_to_json(state.schedule)),
        "curves": json.dumps(state.curves), "sha256": _digest(tensors),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e) from None
    # (transient: its sha256 is in its metadata, so it needs no record in a manifest)
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), record=False)


def load_state(path: Path, spec: ModelSpec) -> TrainingState | None:
    """The state saved at `path` for this very spec, code and torch version; None when there is
    none or it cannot be used (then a warning on stderr says why, and the model starts over)."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        return _discard(path, spec, f"unreadable ({e})")
    if metadata.get("format") != FORMAT:
        return _discard(path, spec, "not a resume file of this format")
    for key, value in _identity(spec).items():
        if metadata.get(key) != value:
            return _discard(path, spec, f"saved by another {key} version" if key != "spec" else "saved for another spec")
    if metadata.get("sha256") != _digest(tensors):
        return _discard(path, spec, "damaged (its sha256 does not match)")
    optimizer = _from_json(json.loads(metadata["optimizer"]))
    optimizer["state"] = {int(i): entries for i, entries in optimizer["state"].items()}
    model, generators, buffers, checkpoints = {}, {}, {}, {}
    for name, t in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "model":
            model[rest] = t
        elif kind == "optimizer":
            index, _, key = rest.partition("/")
            optimizer["state"].setdefault(int(index), {})[key] = t
        elif kind == "generator":
            generators[rest] = t
        elif kind == "buffer":
            buffers[rest] = t
        elif kind == "checkpoint":
            checkpoints[int(rest)] = t.numpy()
    return TrainingState(
        epoch=int(metadata["epoch"]), model=model, optimizer=optimizer, schedule=_from_json(json.loads(metadata["schedule"])),
        generators=generators, buffers=buffers, curves=json.loads(metadata["curves"]),
        checkpoints=dict(sorted(checkpoints.items())), seconds=float(metadata["seconds"]),
    )


def _discard(path: Path, spec: ModelSpec, why: str) -> None:
    print(f"warning: {spec.model_id}: resume file {path} is {why}; training starts over", file=sys.stderr)
    return None


class Saver:
    """Decides when an epoch end saves: the first time `every_s` seconds have passed since the
    run (or the last save) began; never after the last epoch (the model is stored then)."""

    def __init__(self, path: Path | None, spec: ModelSpec):
        self.path, self.spec = path, spec
        self.every_s = save_interval_s()
        self.last = time.monotonic()

    def due(self, epoch: int) -> bool:
        return self.path is not None and epoch < self.spec.training.epochs and time.monotonic() - self.last >= self.every_s

    def save(self, state: TrainingState) -> None:
        save_state(self.path, self.spec, state)
        self.last = time.monotonic()
