"""The paper-scale zoos: catalog entries marked as cluster jobs, the CPU-sized rehearsal
fmnist-resnet18-small through generate, metrics and a benchmark task, and the GPU check script
(run here on the CPU at toy size, so it cannot rot unnoticed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import zoo
from zoo.catalog import load_catalog
from zoo.cli import main

from .conftest import REPO

PAPER = {f"resnet{d}-{s}": 192 for d in (18, 50) for s in ("cifar10", "cifar100", "svhn", "tinyimagenet")}
PAPER.update({"vit-cifar10": 147, "vit-cifar100": 147})


def test_the_paper_zoos_are_declared_as_published_and_marked_as_cluster_jobs():
    catalog = load_catalog(REPO / "catalog.yaml")
    for name, n_models in PAPER.items():
        z = catalog[name]
        assert z.cluster and z.grid_size == n_models and z.launch.gpus_per_node == 1
        epochs = 100 if "tinyimagenet" in name or name.startswith("vit") else 150
        assert z.training.epochs == epochs and z.checkpoints == list(range(epochs + 1))  # every epoch
        assert z.training.schedule == "onecycle"
        spec = z.models()[-1]  # the widest model at the largest batch: shapes known without the data
        if name.startswith("resnet"):
            t = z.training
            assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.augmentation) == ("sgd", 0.1, 0.9, 0.0005, "flip-crop-rotate")
            assert z.load.values == [2, 4, 8, 16, 32, 64, 128, 256] and z.temperature.values == [8, 16, 32, 64, 128, 256, 512, 1024]
            assert spec.architecture == {"name": "resnet", "depth": int(name[6:8]), "width": 256}
        expected_shape = (3, 64, 64) if "tinyimagenet" in name else (3, 32, 32)
        assert tuple(spec.input_shape) == expected_shape and spec.n_classes == {"cifar10": 10, "cifar100": 100, "svhn": 10}.get(name.split("-")[1], 200)


def test_a_cluster_zoo_is_refused_locally_and_its_missing_data_is_named(tmp_path, capsys):
    assert main(["generate", "resnet18-cifar10", "--root", str(tmp_path / "r")]) == 2
    assert "is a cluster job (192 models of 150 epochs, GPUs): run it with --executor slurm" in capsys.readouterr().err
    assert main(["generate", "resnet18-cifar10", "--root", str(tmp_path / "r"), "--allow-local", "--limit", "1",
                 "--executor", "debug", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cifar10: no folder data/cifar-10-batches-bin; expected CIFAR-10's binary version" in err


@pytest.mark.slow
def test_fmnist_resnet18_small_generates_gets_metrics_and_a_benchmark_on_cpu(tmp_path, capsys):
    root = str(tmp_path / "root")
    assert main(["generate", "fmnist-resnet18-small", "--root", root, "--no-progress"]) == 0
    assert main(["metrics", "fmnist-resnet18-small", "--root", root, "--no-progress"]) == 0  # every family
    assert main(["bench", "pruning", "--zoo", "fmnist-resnet18-small", "--root", root, "--no-progress",
                 "--method", "magnitude_global"]) == 0
    z = zoo.open(root)
    models = z.sql("select model_id, arch, n_params, width from models order by width")
    assert len(models) == 8 and set(models["arch"]) == {"resnet"}
    assert z.sql("select count(*) n from checkpoints")["n"][0] == 8 * 4  # every epoch, 0..3
    final = z.sql("select max(test_acc) a from curves where epoch = 3")["a"][0]
    assert final > 0.3  # 3 short epochs on 1,024 images, well above the 0.1 of chance
    metrics = z.sql("select family, count(distinct model_id) n from metrics group by family")
    assert dict(zip(metrics["family"], metrics["n"])) == {f: 8 for f in ("performance", "hessian", "spectral", "weightspace")}
    pairs = z.sql("select family, count(distinct model_a || model_b) n from pair_metrics group by family")
    assert dict(zip(pairs["family"], pairs["n"])) == {"cka": 4, "connectivity": 4}  # one seed pair per cell
    bench = z.sql("select method, count(*) n, count(*) filter (where status = 'ok') ok from benchmark_results group by method")
    assert set(bench["method"]) == {"magnitude_global"} and (bench["n"] == bench["ok"]).all()
    spec = z.spec(models["model_id"][0])
    model = z.load_model(models["model_id"][0])  # rebuilt from the stored config and weights alone
    assert sum(p.numel() for p in model.parameters()) == models["n_params"][0] and spec.architecture["depth"] == 18


def test_the_gpu_check_script_runs(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "perf" / "gpu_check.py"), "--device", "cpu", "--widths", "2",
                          "--models", "2", "--steps", "2", "--batch", "8", "--metric-width", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    row = next(line for line in lines if line.split()[0] == "2")
    assert "(ok)" in row, run.stdout
    families = [line.split()[0] for line in lines if "max relative difference" in line]
    assert families == ["hessian", "spectral", "cka", "connectivity"], run.stdout
    assert all("difference 0.0e+00" in line for line in lines if "max relative difference" in line)  # cpu vs cpu
