"""Mid-model resume: a run stopped after a saved epoch continues from it, with the same bits as
an uninterrupted run; a damaged or foreign state is refused and the model starts over."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
import yaml

from generators import resume
from generators.training import train
from zoo.catalog import parse_zoo
from zoo.cli import main
from zoo.datasets import load_dataset
from zoo.storage import Store
from zoo.weights import sha256

from .test_generate import zoo_cli
from .test_training import ZOO

BASE = {**ZOO, "training": {"lr": 0.05, "momentum": 0.9, "epochs": 5}, "checkpoints": [0, 2, 5]}

RECIPES = {
    # SGD momentum, a step budget (the data stream's leftover indices matter), cosine schedule
    "mlp-sgd-budget-cosine": {"training": {"lr": 0.05, "momentum": 0.9, "epochs": 5, "steps_per_epoch": 7, "schedule": "cosine"}},
    # BatchNorm buffers, every augmentation stream, OneCycle (it also cycles the momentum)
    "cnn-batchnorm-augment-onecycle": {
        "architecture": {"name": "cnn", "width": 4}, "load": {"name": "width", "values": [4]},
        "training": {"lr": 0.05, "momentum": 0.9, "epochs": 4, "augmentation": "flip-crop-rotate", "schedule": "onecycle"},
        "checkpoints": [0, 1, 4]},
    # Adam's step counters and the step schedule's milestones
    "mlp-adam-step": {"training": {"optimizer": "adam", "lr": 0.01, "epochs": 5, "schedule": "step"}},
}


class Stopped(Exception):
    pass


def stop_after_saving(monkeypatch, epoch: int) -> None:
    """Make a run die right after it saved the state of `epoch` (as a kill there would)."""
    real = resume.Saver.save

    def save_then_stop(self, state):
        real(self, state)
        if state.epoch == epoch:
            raise Stopped

    monkeypatch.setattr(resume.Saver, "save", save_then_stop)


def spec_of(body: dict, index: int = 0):
    return parse_zoo("t", {**BASE, **body}).models()[index]


def same_run(a, b) -> None:
    assert a.curves == b.curves
    assert sorted(a.checkpoints) == sorted(b.checkpoints)
    for epoch in a.checkpoints:
        assert sha256(a.checkpoints[epoch]) == sha256(b.checkpoints[epoch]), f"epoch {epoch}"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_run_stopped_after_a_saved_epoch_resumes_there_with_the_same_bits(recipe, tmp_path, monkeypatch):
    spec = spec_of(RECIPES[recipe])
    data = load_dataset(spec.dataset)
    clean = train(spec, data)
    assert clean.resumed_from is None
    monkeypatch.setenv("ZOO_RESUME_EVERY_S", "0")
    path = tmp_path / "resume" / f"{spec.model_id}.safetensors"
    with monkeypatch.context() as m:
        stop_after_saving(m, 2)
        with pytest.raises(Stopped):
            train(spec, data, resume=path)
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    resumed = train(spec, data, resume=path)
    assert resumed.resumed_from == 2
    same_run(resumed, clean)
    assert resumed.train_seconds > 0


def test_saves_come_at_most_every_interval_and_never_after_the_last_epoch(tmp_path, monkeypatch):
    spec = spec_of({})
    data = load_dataset(spec.dataset)
    saved = []
    real = resume.Saver.save
    monkeypatch.setattr(resume.Saver, "save", lambda self, state: (saved.append(state.epoch), real(self, state)))
    monkeypatch.setenv("ZOO_RESUME_EVERY_S", "0")
    train(spec, data, resume=tmp_path / "a.safetensors")
    assert saved == [1, 2, 3, 4]  # every epoch end but the last
    saved.clear()
    monkeypatch.setenv("ZOO_RESUME_EVERY_S", "3600")
    train(spec, data, resume=tmp_path / "b.safetensors")
    assert saved == [] and not (tmp_path / "b.safetensors").exists()  # a short run never pays for a save


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-spec"])
def test_a_damaged_or_foreign_state_is_refused_and_the_model_starts_over(damage, tmp_path, monkeypatch, capsys):
    spec, other = spec_of({}, 0), spec_of({}, 1)
    data = load_dataset(spec.dataset)
    clean = train(spec, data)
    monkeypatch.setenv("ZOO_RESUME_EVERY_S", "0")
    path = tmp_path / f"{spec.model_id}.safetensors"
    with monkeypatch.context() as m:
        stop_after_saving(m, 3)
        with pytest.raises(Stopped):
            train(other if damage == "other-spec" else spec, data, resume=path)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x10  # in the tensors' bytes
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    again = train(spec, data, resume=path)
    assert again.resumed_from is None
    same_run(again, clean)
    err = capsys.readouterr().err
    assert spec.model_id in err and "training starts over" in err
    assert {"flip": "sha256", "truncate": "unreadable", "other-spec": "another spec"}[damage] in err


def test_a_bad_save_interval_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_RESUME_EVERY_S", "soon")
    assert main(["generate", "smoke", "--executor", "debug", "--no-progress", "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "ZOO_RESUME_EVERY_S" in err and "soon" in err and "Traceback" not in err


@pytest.mark.slow
def test_kill_9_mid_model_then_rerun_resumes_it_and_stores_the_uninterrupted_bits(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    body = {**BASE, "seeds": [0], "training": {"lr": 0.05, "momentum": 0.9, "epochs": 30}, "checkpoints": [0, 15, 30]}
    catalog.write_text(yaml.safe_dump({"zoos": {"long": body}}))
    spec = parse_zoo("long", body).models()[0]
    root = tmp_path / "root"
    env = {"ZOO_RESUME_EVERY_S": "0"}
    args = ["generate", "long", "--catalog", str(catalog), "--root", str(root), "--no-stack", "--no-progress", "--executor", "debug",
            "--jobs-dir", str(tmp_path / "jobs")]
    proc = zoo_cli(*args, env=env)
    saved = root / "resume" / "long" / f"{spec.model_id}.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and not saved.exists():
        time.sleep(0.01)
    assert saved.exists(), proc.communicate()[1]
    time.sleep(0.1)  # a few more epochs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Store(root).stored_ids("models", "long"), "the kill came after the model was stored"
    proc = zoo_cli(*args, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed {spec.model_id} after its saved epoch" in err, err
    import zoo

    z = zoo.open(root)
    stored = dict(z.sql("select epoch, sha256 from checkpoints").itertuples(index=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as jobs train (float sums may depend on the thread count)
    try:
        clean = train(spec, load_dataset(spec.dataset))
    finally:
        torch.set_num_threads(threads)
    assert stored == {e: sha256(w) for e, w in clean.checkpoints.items()}
    curves = z.sql("select * from curves order by epoch")
    assert np.array_equal(curves["test_loss"].to_numpy(), [c["test_loss"] for c in clean.curves])
    assert not saved.exists() and not list(root.rglob("*.tmp"))


def test_the_saved_state_of_a_model_already_stored_is_swept(smoke_root, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    store = Store(root)
    stored = sorted(store.stored_ids("models", "smoke"))[0]
    leftover, in_training = store.resume_path("smoke", stored), store.resume_path("smoke", "not-yet-stored")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x")
    in_training.write_bytes(b"x")
    store.write_index()  # writes the index only
    assert leftover.exists() and in_training.exists()
    store.sweep()  # (what `zoo generate` does once its models are stored, and `zoo verify`)
    assert not leftover.exists() and in_training.exists()
