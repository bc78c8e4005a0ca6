"""benchmarks/: merge, prune and prediction methods against hand computations, and the harness
(task files, results table, reuse, failures, leaderboard, CLI) on the smoke zoo."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import benchmarks
import zoo
from benchmarks import merging, pruning
from benchmarks.runner import run_task
from benchmarks.evaluation import with_state
from benchmarks.tasks import find_task, load_task
from zoo.architectures import build_model
from zoo.cli import main
from zoo.errors import ZooError
from zoo.launch import LaunchOptions
from zoo.permutations import permutation_spec, permute_state, random_permutations


@pytest.fixture()
def root(smoke_root, tmp_path) -> Path:
    """A writable copy of the smoke zoo."""
    copy = tmp_path / "root"
    shutil.copytree(smoke_root, copy)
    return copy


def _state(seed: int, arch=None, shape=(64,)) -> tuple[nn.Module, dict]:
    model = build_model(arch or {"name": "mlp", "width": 16}, shape, 10, seed=seed)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- merge functions


def test_ties_on_hand_made_vectors():
    base = {"w": torch.zeros(5)}
    a = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0])}
    b = {"w": torch.tensor([-2.0, -4.0, 0.1, 1.0, 0.2])}
    # keep 40% of 5 entries = 2 per vector: a keeps 3 and 2 (indices 0, 3); b keeps -4 and -2 (1, 0)
    # trimmed a = [3, 0, 0, 2, 0], b = [-2, -4, 0, 0, 0]; elected sign = sign(sum) = [+, -, ?, +, ?]
    # entries 2 and 4 have no kept value: sign from the untrimmed sum, mean over none -> 0
    merged = merging.ties(base, [a, b], keep=0.4, lam=0.5)
    assert torch.allclose(merged["w"], 0.5 * torch.tensor([3.0, -4.0, 0.0, 2.0, 0.0]))


def test_dare_drops_and_rescales():
    delta = {"w": torch.arange(1.0, 1001.0)}
    out = merging.dare(delta, 0.9, torch.Generator().manual_seed(0))["w"]
    kept = out != 0
    assert torch.allclose(out[kept], delta["w"][kept] / 0.1)  # survivors rescaled by 1/(1-p)
    assert 0.05 < kept.float().mean() < 0.15  # about 1 - p survive
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        merging.dare(delta, 1.0, torch.Generator())


def test_task_arithmetic_and_interpolation_are_the_formulas():
    base, a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 5.0])}
    assert torch.allclose(merging.task_arithmetic(base, [a, b], 0.5)["w"], torch.tensor([1.5, 3.5]))
    assert torch.allclose(merging.interpolate(a, b, 0.25)["w"], torch.tensor([1.75, 2.75]))
    assert torch.allclose(merging.uniform_soup([a, b])["w"], torch.tensor([1.5, 3.5]))


def test_greedy_soup_starts_from_the_best_and_only_adds_what_helps():
    states = [{"w": torch.tensor([float(v)])} for v in (1.0, 3.0, 2.0, 10.0)]
    score = lambda s: -abs(float(s["w"]) - 2.5)  # noqa: E731  best: 3 (-0.5), then 2 (-0.5): 2.5 is perfect
    soup, chosen = merging.greedy_soup(states, score)
    assert chosen[0] == 1 and score(soup) >= max(score(s) for s in states)
    assert float(soup["w"]) == pytest.approx(2.5) and chosen == [1, 2]


@pytest.mark.parametrize("arch, shape, n_groups", [
    ({"name": "mlp", "width": 16, "depth": 3}, (64,), 3),
    ({"name": "cnn", "width": 4, "depth": 2, "batchnorm": True}, (1, 8, 8), 2),
    # 4 residual streams (one per stage: a projection starts each but the first) + 8 block bodies
    ({"name": "resnet", "width": 2, "depth": 18}, (3, 8, 8), 4 + 8),
    # the stem's stream + 4 projected streams + 16 bottlenecks x 2 inner layers
    ({"name": "resnet", "width": 2, "depth": 50}, (3, 8, 8), 5 + 32),
    # the residual stream + one MLP hidden layer per block
    ({"name": "vit", "width": 8, "depth": 2, "heads": 2, "patch_size": 4}, (3, 8, 8), 1 + 2),
])
def test_weight_matching_recovers_a_known_permutation(arch, shape, n_groups):
    model, state = _state(0, arch, shape)
    with torch.no_grad():  # make the statistics and the norms' affine parameters non-trivial
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = permutation_spec(model)
    assert len(spec) == n_groups
    perms = random_permutations(spec, torch.Generator().manual_seed(1))
    shuffled = permute_state(state, spec, perms)
    assert any(not torch.equal(shuffled[k], state[k]) for k in state)
    x = torch.randn(7, *shape)
    assert torch.allclose(with_state(model, shuffled)(x), with_state(model, state)(x), atol=1e-5)  # same function
    found = merging.weight_matching(state, shuffled, spec)
    aligned = permute_state(shuffled, spec, found)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


# --------------------------------------------------------------------------- pruning


def test_alpha_allocation_meets_the_target_and_prunes_high_alpha_layers_more():
    alphas, sizes = np.array([2.0, 4.0, 6.0, 3.0]), np.array([1000, 4000, 500, 2000])
    for target in (0.5, 0.7, 0.9):
        s = pruning.allocate_by_alpha(alphas, sizes, target, eps=0.2)
        assert np.sum(s * sizes) / sizes.sum() == pytest.approx(target, abs=1e-9)
        assert np.all(np.diff(s[np.argsort(alphas)]) > 0)  # higher alpha -> higher sparsity


@pytest.mark.parametrize("method", ["random", "magnitude_layerwise", "magnitude_global", "alpha_pruning", "farms_pruning"])
def test_every_pruning_method_reaches_its_sparsity(method):
    model, _ = _state(3, {"name": "mlp", "width": 32})
    call = benchmarks.METHODS[method]
    masks = call.function(model, call.parameters(sparsity=0.7), torch.Generator().manual_seed(0))
    pruned = pruning.apply_masks(model, masks)
    assert pruning.sparsity(pruned) == pytest.approx(0.7, abs=0.01)


def test_global_magnitude_keeps_the_largest_weights():
    model, _ = _state(4)
    call = benchmarks.METHODS["magnitude_global"]
    masks = call.function(model, call.parameters(sparsity=0.5), None)
    kept = torch.cat([(layer.weight.abs() * masks[n]).reshape(-1) for n, layer in pruning.prunable(model)])
    dropped = torch.cat([(layer.weight.abs() * (1 - masks[n])).reshape(-1) for n, layer in pruning.prunable(model)])
    assert kept[kept > 0].min() >= dropped.max()


# --------------------------------------------------------------------------- harness


def test_builtin_tasks_load_and_list(capsys):
    names = benchmarks.discover_tasks()
    assert {"merging-seeds", "merging-epochs", "merging-tasks", "pruning", "property-prediction"} <= set(names)
    for path in names.values():
        assert load_task(path).calls
    assert main(["tasks"]) == 0
    assert "merging-seeds" in capsys.readouterr().out


def _write(path: Path, body: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(body))
    return path


TASK = {"task": "mine", "protocol": "prune", "zoo": "smoke",
        "methods": [{"method": "magnitude_global", "sweep": {"sparsity": [0.5]}}],
        "metrics": ["test_acc"]}


@pytest.mark.parametrize("change, message", [
    ({"methods": [{"method": "nope"}]}, r"field 'methods.0': unknown method 'nope'"),
    ({"methods": [{"method": "random", "parameters": {"sparsty": 0.5}}]}, r"field 'methods.0': method 'random', parameter 'sparsty': unknown field"),
    ({"methods": [{"method": "random", "sweep": {"sparsity": [1.5]}}]}, r"parameter 'sparsity': Input should be less than 1"),
    ({"methods": [{"method": "uniform_soup"}]}, r"'uniform_soup' is a merging method; protocol 'prune' scores pruning"),
    ({"metrics": ["accuracy"]}, r"field 'metrics.0': task 'mine': protocol 'prune' reports no metric 'accuracy'"),
    ({"metrics": [{"name": "test_acc", "higher_is_better": True}]}, r"field 'metrics.0': name the metric only"),
    ({"metrics": ["test_acc", "test_acc"]}, r"field 'metrics.1': task 'mine' lists metric 'test_acc' twice"),
    ({"protocol": "nope"}, r"field 'protocol': unknown protocol 'nope'"),
    ({"settings": {"finetune_epochs": -1}}, r"field 'settings.finetune_epochs'"),
    ({"colour": "red"}, r"field 'colour': unknown field"),
])
def test_a_bad_task_file_names_the_file_and_field(tmp_path, change, message):
    path = _write(tmp_path / "bad.yaml", {**TASK, **change})
    with pytest.raises(ZooError, match=message) as e:
        load_task(path)
    assert str(path) in str(e.value)


def test_sql_that_selects_no_models_is_a_clear_error(root, tmp_path, capsys):
    path = _write(tmp_path / "empty.yaml", {**TASK, "select": "SELECT model_id FROM models WHERE load > 1000"})
    assert main(["bench", str(path), "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error:") and "field 'select'" in err and "selects no models" in err and "\n" not in err


def test_bench_stores_results_reuses_them_and_the_leaderboard_needs_no_recomputation(root, capsys):
    z = zoo.open(root)
    task = find_task("merging-seeds")
    report = run_task(z, task, "smoke")
    assert report.computed == len(task.calls) * 4 and not report.failed  # 4 cells
    rows = zoo.open(root).sql("select * from benchmark_results where task = 'merging-seeds'")
    assert set(rows["status"]) == {"ok"} and rows["code_version"].str.len().min() > 0
    settings = json.loads(rows["settings"].iloc[0])
    assert settings["versions"]["torch"] == torch.__version__ and settings["settings"]["seed"] == 0
    # greedy soup is never below its best ingredient on the split it selects on (validation)
    greedy = rows[(rows["method"] == "greedy_soup")].pivot_table(index="unit", columns="metric", values="value")
    z2 = zoo.open(root)
    for unit, row in greedy.iterrows():
        cell = rows[(rows["unit"] == unit)].iloc[0]
        ids = z2.sql("select model_id from models where zoo='smoke' and load=? and temperature=? order by seed",
                     [float(cell["load"]), float(cell["temperature"])])["model_id"]
        from benchmarks.evaluation import accuracy, holdout

        split = holdout(z2.data(ids[0]))
        best_val = max(accuracy(z2.load_model(m), split.x_val, split.y_val) for m in ids)
        assert row["val_acc"] >= best_val
        assert row["test_acc"] == pytest.approx(row["best_ingredient_acc"] + row["gain_over_best"])

    # a rerun reuses every stored result; the leaderboard is rebuilt without any method running
    def boom(*args):
        raise AssertionError("recomputed")

    frozen = dataclasses.replace(task, protocol=dataclasses.replace(task.protocol, function=boom))
    assert run_task(zoo.open(root), frozen, "smoke").computed == 0
    capsys.readouterr()
    assert main(["leaderboard", "--root", str(root), "--task", "merging-seeds", "--format", "json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert {b["method"] for b in board} == {"uniform_soup", "greedy_soup", "weight_matching_soup",
                                           "interpolation(alpha=0.25)", "interpolation(alpha=0.5)", "interpolation(alpha=0.75)"}
    assert [b["rank"] for b in board] == list(range(1, len(board) + 1))
    assert board == sorted(board, key=lambda b: -b["test_acc"])
    for fmt, marker in (("markdown", "| task | zoo |"), ("html", "<table"), ("table", "rank")):
        assert main(["leaderboard", "--root", str(root), "--format", fmt, "--by", "phase"]) == 0
        assert marker in capsys.readouterr().out


def test_a_method_that_raises_on_one_cell_fails_that_cell_only_and_is_retried(root, tmp_path):
    hook = tmp_path / "flaky.py"
    hook.write_text(
        "import os\n"
        "from benchmarks import register_method\n"
        "from benchmarks.merging import uniform_soup\n"
        "@register_method('flaky_soup', kind='merging')\n"
        "def flaky(states, p, ctx):\n"
        "    if os.environ.get('FLAKY') and len(states[0]['1.weight']) == 8:\n"
        "        raise RuntimeError('width 8 is cursed')\n"
        "    return uniform_soup(states)\n"
    )
    path = _write(tmp_path / "flaky.yaml", {"task": "flaky", "protocol": "merge_seeds", "hook": "flaky.py",
                                            "methods": [{"method": "flaky_soup"}], "metrics": ["test_acc"]})
    task = load_task(path)
    import os

    os.environ["FLAKY"] = "1"
    try:
        report = run_task(zoo.open(root), task, "smoke")
    finally:
        del os.environ["FLAKY"]
    assert report.computed == 4 and len(report.failed) == 2 and all("width 8 is cursed" in f for f in report.failed)
    rows = zoo.open(root).sql("select unit, status, error from benchmark_results where task = 'flaky'")
    assert sorted(rows["status"]) == ["failed", "failed", "ok", "ok"]
    board = benchmarks.leaderboard(zoo.open(root), "flaky")
    assert int(board["failed"].iloc[0]) == 2 and int(board["units"].iloc[0]) == 2
    again = run_task(zoo.open(root), task, "smoke")  # the failed cells only are computed again
    assert again.computed == 2 and again.reused == 2 and not again.failed
    assert set(zoo.open(root).sql("select status from benchmark_results where task = 'flaky'")["status"]) == {"ok"}


def test_a_task_in_a_user_folder_is_found_by_name(root, tmp_path, capsys):
    folder = tmp_path / "mytasks"
    folder.mkdir()
    _write(folder / "mine.yaml", TASK)
    assert main(["bench", "mine", "--include-path", str(folder), "--root", str(root), "--no-progress"]) == 0
    assert "magnitude_global" in capsys.readouterr().out
    assert main(["bench", "mine", "--root", str(root)]) == 2
    assert "unknown task 'mine'" in capsys.readouterr().err


@pytest.mark.slow
def test_every_builtin_task_runs_on_the_smoke_zoo(root, capsys):
    for name in ("merging-epochs", "merging-tasks", "pruning", "property-prediction"):
        assert main(["bench", name, "--zoo", "smoke", "--root", str(root), "--no-progress"]) == 0, name
        assert "failed 0" in capsys.readouterr().err
    board = benchmarks.leaderboard(zoo.open(root), "merging-tasks")
    assert set(board["method"]) == {"task_arithmetic", "ties", "dare"}
    assert (board["test_acc"] > 0.1).all()
    prediction = benchmarks.leaderboard(zoo.open(root), "property-prediction")
    assert {"r2_test_acc", "phase_accuracy"} <= set(prediction.columns)


# --------------------------------------------------------------------------- weights as a data set


def test_weight_dataset_yields_weights_properties_and_function_preserving_permutations(smoke_root):
    from zoo.population import WeightDataset

    z = zoo.open(smoke_root)
    query = "SELECT model_id FROM models WHERE zoo = 'smoke' AND load = 32 ORDER BY temperature, seed"
    plain = WeightDataset(z, query)
    ids = list(z.sql(query)["model_id"])
    assert len(plain) == 4 and torch.equal(plain[0]["weights"], z.weights(ids[:1])[0])
    item = plain[1]
    assert item["model_id"] == ids[1] and item["load"] == 32 and item["phase"] == "unlabelled"
    assert item["gap"] == pytest.approx(item["train_acc"] - item["test_acc"])
    permuted = WeightDataset(z, query, permute=True, layers=True, seed=0)
    model = z.load_model(ids[0])
    x = z.data(ids[0]).x_test[:50]
    state = permuted[0]["weights"]
    assert any(not torch.equal(state[k], model.state_dict()[k]) for k in state)

    assert torch.allclose(with_state(model, state)(x), model(x), atol=1e-5)


def test_weight_dataset_permutations_differ_across_dataloader_workers_and_epochs(smoke_root):
    from torch.utils.data import DataLoader

    from zoo.population import WeightDataset

    z = zoo.open(smoke_root)
    query = "SELECT model_id FROM models WHERE zoo = 'smoke' AND load = 32 ORDER BY temperature, seed"
    data = WeightDataset(z, [z.sql(query)["model_id"][0]] * 1, permute=True, seed=0)
    data.matrix = data.matrix.repeat(4, 1)  # one model four times: only the permutations differ
    data._items = data._items * 4
    loader = DataLoader(data, batch_size=1, num_workers=2)
    seen = [tuple(item["weights"][0].tolist()) for _ in range(2) for item in loader]
    assert len(seen) == 8 and len(set(seen)) == 8  # (the parent's generator copied: 2 distinct)
    with pytest.raises(ZooError, match="different parameter counts"):
        WeightDataset(z, "SELECT model_id FROM models WHERE zoo = 'smoke'")


def test_property_features_match_the_weightspace_statistics(smoke_root):
    from benchmarks.prediction import weight_features
    from metrics.weightspace import layer_statistics

    z = zoo.open(smoke_root)
    ids = list(z.sql("select model_id from models where zoo = 'smoke' order by load, temperature, seed")["model_id"])
    features = weight_features(z, ids)
    assert features.shape == (8, 6 * 7)
    model = z.load_model(ids[-1])
    expected = []
    for _, tensor in model.named_parameters():
        s = layer_statistics(tensor)
        expected += [s["mean"], s["var"], s["p1"], s["p25"], s["p50"], s["p75"], s["p99"]]
    assert np.allclose(features[-1], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_batchnorm_reestimation_rescues_averaged_batchnorm_cnns(tmp_path):
    """Averaging BatchNorm CNNs (here after weight matching, and plain) keeps the ingredients'
    running statistics, which no longer fit the averaged weights; re-estimating them on training
    data recovers much of the accuracy (the fmnist-cnn zoo's architecture, on digits)."""
    from generators.launcher import LaunchOptions, generate
    from zoo.catalog import parse_zoo
    from zoo.storage import Store

    config = parse_zoo("bn-cnn", {
        "description": "BatchNorm CNNs", "dataset": {"name": "digits"},
        "architecture": {"name": "cnn", "depth": 2, "batchnorm": True},
        "load": {"name": "width", "values": [8]}, "temperature": {"name": "batch_size", "values": [32]},
        "seeds": [0, 1, 2], "training": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 5},
        "checkpoints": [0, 5]})
    store = Store(tmp_path / "root", create=True)
    assert generate(config, store, LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs"), progress=False).trained == 3
    task = _write(tmp_path / "bn.yaml", {"task": "bn", "protocol": "merge_seeds", "zoo": "bn-cnn",
                                        "methods": [{"method": "uniform_soup"}, {"method": "weight_matching_soup"}],
                                        "metrics": ["test_acc", "test_acc_bn"]})
    assert not run_task(zoo.open(store.root), load_task(task), "bn-cnn").failed
    board = benchmarks.leaderboard(zoo.open(store.root), "bn").set_index("method")
    for method in ("uniform_soup", "weight_matching_soup"):
        assert board.loc[method, "test_acc_bn"] > board.loc[method, "test_acc"] + 0.1
    assert board.loc["weight_matching_soup", "test_acc_bn"] > 0.5  # aligned + re-estimated: a working model


@pytest.mark.slow
def test_weight_generation_scores_accuracy_and_novelty(root, tmp_path):
    task = _write(tmp_path / "gen.yaml", {
        "task": "gen", "protocol": "generate_weights", "zoo": "smoke",
        "select": "SELECT model_id FROM models WHERE zoo = $zoo AND load = 32",
        "settings": {"samples": 5}, "metrics": ["gen_acc_mean", "novelty_iou"],
        "methods": [{"method": "copies"}, {"method": "random_init"}, {"method": "gaussian"},
                    {"method": "autoencoder", "parameters": {"latent": 2, "steps": 200}}]})
    assert not run_task(zoo.open(root), load_task(task), "smoke").failed
    board = benchmarks.leaderboard(zoo.open(root), "gen").set_index("method")
    assert board.loc["copies", "novelty_iou"] == 1.0  # a copy misclassifies exactly what its original does
    assert board.loc["random_init", "gen_acc_mean"] < 0.3  # chance is 0.1
    assert board.loc["autoencoder", "novelty_iou"] < 1.0
    assert board.loc["autoencoder", "gen_acc_mean"] > board.loc["random_init", "gen_acc_mean"]


def chromium_console(page: Path, screenshot: Path) -> list[str]:
    """Open `page` in headless Chromium (Debian's `chromium`), save a screenshot, and return the
    page's console messages (the report logs a console error for every image that fails)."""
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "this test needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    run = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--window-size=1280,4000", "--virtual-time-budget=5000", f"--screenshot={screenshot}",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, run.stderr[-2000:]
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_report_opens_in_a_browser_without_errors_or_missing_images(root, tmp_path, capsys):
    import re

    for name in ("merging-seeds", "pruning"):
        task = find_task(name)
        calls = [c for c in task.calls if c.method.name in ("uniform_soup", "greedy_soup", "interpolation", "magnitude_global", "random")]
        run_task(zoo.open(root), dataclasses.replace(task, calls=calls), "smoke")
    assert main(["report", "--root", str(root), "--out", str(tmp_path / "site")]) == 0
    index = tmp_path / "site" / "index.html"
    page = index.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert len(images) >= 5
    for image in images:
        assert (index.parent / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    assert "sparsity" in page and "interpolation" in page and "<table" in page
    assert chromium_console(index, tmp_path / "shot.png") == []
    # the check itself catches a missing image
    (index.parent / images[0]).unlink()
    messages = chromium_console(index, tmp_path / "shot2.png")
    assert any("missing image" in m for m in messages)


def test_the_readme_example_task_and_hook_run_as_written(root, tmp_path, capsys):
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Adding a task or a method"):]
    blocks = re.findall(r"```(?:yaml|python)\n(.*?)```", section, re.S)[:2]
    folder = tmp_path / "mytasks"
    folder.mkdir()
    for body in blocks:
        (folder / body.splitlines()[0].split("/")[-1]).write_text(body.replace("width >= 128", "width >= 8"))
    assert main(["bench", "wide-soups", "--zoo", "smoke", "--include-path", str(folder), "--root", str(root), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "failed 0" in captured.err and "trimmed_soup(trim=0.25)" in captured.out


def test_pruning_with_a_short_finetune_keeps_the_mask_and_recovers_accuracy(root, tmp_path):
    path = _write(tmp_path / "ft.yaml", {**TASK, "task": "ft", "settings": {"finetune_epochs": 2},
                                         "methods": [{"method": "magnitude_global", "parameters": {"sparsity": 0.9}}],
                                         "metrics": ["test_acc", "test_acc_finetuned", "sparsity"]})
    seen = []
    original = pruning._masked_finetune

    def spy(model, masks, split, s):
        out = original(model, masks, split, s)
        seen.append(pruning.sparsity(out))
        return out

    pruning._masked_finetune = spy
    try:
        assert not run_task(zoo.open(root), load_task(path), "smoke").failed
    finally:
        pruning._masked_finetune = original
    assert len(seen) == 8 and min(seen) >= 0.9 - 1e-3  # pruned weights stayed zero through the fine-tune
    board = benchmarks.leaderboard(zoo.open(root), "ft").iloc[0]
    assert board["test_acc_finetuned"] > board["test_acc"]


@pytest.mark.parametrize("method", ["alpha_pruning", "farms_pruning"])
def test_alpha_allocation_leaves_a_few_eigenvalue_head_at_the_median(method):
    """A 10-class head has 10 eigenvalues: its alpha is noise, so it gets the others' median
    alpha instead of whatever its fit says (it was once pruned to 100%)."""
    model, _ = _state(5, {"name": "mlp", "width": 64, "depth": 3})
    call = benchmarks.METHODS[method]
    masks = call.function(model, call.parameters(sparsity=0.6), None)
    kept = {name: float(mask.mean()) for name, mask in masks.items()}
    head, others = kept.pop("7"), sorted(kept.values())
    assert others[0] - 1e-3 <= head <= others[-1] + 1e-3 and head == pytest.approx(others[1], abs=0.01)
    assert pruning.sparsity(pruning.apply_masks(model, masks)) == pytest.approx(0.6, abs=0.01)


def test_the_autoencoder_refuses_too_few_models_or_too_many_weights_before_training(monkeypatch):
    from benchmarks import generation

    def never(*args, **kwargs):
        raise AssertionError("trained anyway")

    monkeypatch.setattr(generation.torch.optim, "Adam", never)
    ctx = generation.GenerationContext(model_spec=None, index=[], n=2, generator=torch.Generator(), seed=0)
    p = generation.AutoencoderParameters()
    with pytest.raises(ValueError, match="4 models are too few for a 16-dimensional latent KDE"):
        generation.autoencoder(torch.zeros(4, 10), p, ctx)
    too_wide = generation.AUTOENCODER_MAX_WEIGHTS // p.hidden + 1
    with pytest.raises(ValueError, match="does not scale"):
        generation.autoencoder(torch.zeros(20, too_wide), p, ctx)


def test_a_hook_that_registers_a_built_in_name_is_refused_naming_both_definitions(root, tmp_path, capsys):
    (tmp_path / "sneaky.py").write_text(
        "from benchmarks.registry import register_method\n"
        "@register_method('uniform_soup', 'merging')\n"
        "def my_soup(states, parameters, context):\n"
        "    return states[0]\n"
    )
    path = _write(tmp_path / "sneaky.yaml", {"task": "sneaky", "protocol": "merge_seeds", "hook": "sneaky.py",
                                             "methods": [{"method": "uniform_soup"}], "metrics": ["test_acc"]})
    assert main(["bench", str(path), "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method 'uniform_soup' is defined twice" in err
    assert "benchmarks.merging._uniform_soup" in err and "my_soup" in err and "sneaky.py" in err
    assert benchmarks.METHODS["uniform_soup"].function.__module__ == "benchmarks.merging"


# --------------------------------------------------------------------------- contracts and metric directions


def _kind(argument: int, p, seed):
    return None


def _register(kind: str, function, name: str, parameters=benchmarks.Parameters):
    return benchmarks.register_method(name, kind=kind, parameters=parameters)(function)


def _merge_too_few(states, p):
    return states[0]


def _merge_too_many(states, p, ctx, extra):
    return states[0]


def _merge_keyword_only(states, p, ctx, *, extra):
    return states[0]


def _merge_wrong_parameters(states, p: merging.TiesParameters, ctx):
    return states[0]


def _merge_wrong_input(states: nn.Module, p, ctx):
    return states


def _merge_wrong_return(states, p, ctx) -> float:
    return 0.0


@pytest.mark.parametrize("function, problem", [
    (_merge_too_few, "has the signature (states, p), but it takes 2 positional arguments and is passed 3"),
    (_merge_too_many, "has the signature (states, p, ctx, extra), but it requires 4 positional arguments and is passed 3"),
    (_merge_keyword_only, "its keyword-only argument 'extra' is never passed"),
    (_merge_wrong_parameters, "its argument 'p' is annotated merging.TiesParameters and is passed an instance of Parameters"),
    (_merge_wrong_input, "its argument 'states' is annotated nn.Module and is passed list[StateDict]"),
    (_merge_wrong_return, "has the signature (states, p, ctx) -> float, but it returns float"),
])
def test_a_method_of_the_wrong_shape_is_refused_when_registered_naming_it_and_the_expected_signature(function, problem):
    name = f"misshapen{function.__name__}"
    with pytest.raises(ZooError) as e:
        _register("merging", function, name)
    message = str(e.value)
    assert "\n" not in message and f"merging method {name!r}" in message and function.__qualname__ in message
    assert problem in message
    assert message.endswith("expected (states: list[StateDict], p: Parameters, ctx: MergeContext, /) -> StateDict")
    assert name not in benchmarks.METHODS


def test_each_kind_has_its_own_contract_and_any_argument_names_fit_it():
    def masks(model, parameters: pruning.PruneParameters, rng):  # names are free: arguments go by position
        return {}

    assert _register("pruning", masks, "contract_masks", pruning.PruneParameters) is masks
    assert benchmarks.METHODS["contract_masks"].function is masks
    with pytest.raises(ZooError, match=r"^prediction method 'contract_model' .* but its argument 'argument' is annotated "
                                       r"int and is passed PredictionKind; expected \(kind: PredictionKind, p: Parameters, "
                                       r"seed: int, /\) -> Estimator$"):
        _register("prediction", _kind, "contract_model")
    # a plain merge function (one argument) is not a generation method
    with pytest.raises(ZooError, match=r"expected \(weights: torch.Tensor, p: Parameters, ctx: GenerationContext, /\) "
                                       r"-> torch.Tensor$"):
        _register("generation", merging.uniform_soup, "contract_generation")
    # a protocol's function takes (unit, call, settings), its settings annotated with a base of the declared class
    with pytest.raises(ZooError, match=r"protocol 'contract_protocol' .* expected \(unit: UnitContext, call: MethodCall, "
                                       r"settings: PruneSettings, /\) -> Scores$"):
        benchmarks.register_protocol("contract_protocol", "pruning", "model", {"test_acc": "higher"},
                                     pruning.PruneSettings)(lambda unit, call: {})
    assert "contract_protocol" not in benchmarks.PROTOCOLS


@pytest.mark.parametrize("register, message", [
    (lambda: _register("merge", merging.uniform_soup, "contract_unknown"),
     r"^method 'contract_unknown' \(.*uniform_soup.*\): unknown kind 'merge'; known: merging, pruning, prediction, generation$"),
    (lambda: benchmarks.register_protocol("contract_unknown", "prunning", "model", {"a": "higher"})(lambda u, c, s: {}),
     r"^protocol 'contract_unknown' \(.*\): unknown kind 'prunning'; known: merging, pruning, prediction, generation$"),
    (lambda: benchmarks.register_protocol("contract_unknown", "pruning", "model", ("test_acc",))(lambda u, c, s: {}),
     r"metrics are declared with their direction, e\.g\. metrics=\{'test_acc': 'higher', 'acc_drop': 'lower'\}"),
    (lambda: benchmarks.register_protocol("contract_unknown", "pruning", "model", {"test_acc": "up"})(lambda u, c, s: {}),
     r"metric 'test_acc' has direction 'up'; a metric's direction is 'higher' or 'lower'$"),
])
def test_an_unknown_kind_or_an_undirected_metric_is_refused_when_registered(register, message):
    with pytest.raises(ZooError, match=message):
        register()
    assert "contract_unknown" not in benchmarks.METHODS and "contract_unknown" not in benchmarks.PROTOCOLS


def test_a_hook_that_registers_a_misshapen_method_gets_one_line_from_zoo_bench(root, tmp_path, capsys):
    (tmp_path / "misshapen.py").write_text(
        "from benchmarks import register_method\n"
        "@register_method('two_argument_soup', kind='merging')\n"
        "def two_argument_soup(states, p):\n"
        "    return states[0]\n"
    )
    path = _write(tmp_path / "misshapen.yaml", {"task": "misshapen", "protocol": "merge_seeds", "hook": "misshapen.py",
                                                "methods": [{"method": "two_argument_soup"}]})
    assert main(["bench", str(path), "--root", str(root), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("zoo: error:") and "Traceback" not in err + captured.out
    assert "field 'hook'" in err and "merging method 'two_argument_soup'" in err and "misshapen.py" in err
    assert "(states, p)" in err and "expected (states: list[StateDict], p: Parameters, ctx: MergeContext, /) -> StateDict" in err
    assert "two_argument_soup" not in benchmarks.METHODS


def test_a_task_names_only_the_metrics_to_show_and_an_unknown_one_is_one_line(tmp_path):
    everything = load_task(_write(tmp_path / "all.yaml", {k: v for k, v in TASK.items() if k != "metrics"}))
    assert everything.metrics == ("test_acc", "test_acc_before", "acc_drop", "test_acc_finetuned", "sparsity")
    chosen = load_task(_write(tmp_path / "two.yaml", {**TASK, "metrics": ["acc_drop", "test_acc"]}))
    assert chosen.metrics == ("acc_drop", "test_acc") and chosen.higher_is_better == {"acc_drop": False, "test_acc": True}
    path = _write(tmp_path / "bad.yaml", {**TASK, "metrics": ["test_acc", "acc"]})
    with pytest.raises(ZooError) as e:
        load_task(path)
    assert str(e.value) == (f"{path}, field 'metrics.1': task 'mine': protocol 'prune' reports no metric 'acc'; "
                            f"it reports: test_acc, test_acc_before, acc_drop, test_acc_finetuned, sparsity")


def test_the_leaderboard_ranks_in_the_direction_the_protocol_declares(root, tmp_path):
    (tmp_path / "directed.py").write_text(
        "from benchmarks import register_protocol\n"
        "@register_protocol('directed', kind='prediction', unit='population', metrics={'loss': 'lower', 'score': 'higher'})\n"
        "def directed(unit, call, settings):\n"
        "    return {'loss': call.parameters.alpha, 'score': call.parameters.alpha}\n"
    )
    body = {"protocol": "directed", "hook": "directed.py", "methods": [{"method": "linear", "sweep": {"alpha": [3.0, 1.0, 10.0]}}]}
    by_loss = load_task(_write(tmp_path / "by-loss.yaml", {**body, "task": "by-loss", "metrics": ["loss", "score"]}))
    by_score = load_task(_write(tmp_path / "by-score.yaml", {**body, "task": "by-score", "metrics": ["score", "loss"]}))
    for task in (by_loss, by_score):
        assert not run_task(zoo.open(root), task, "smoke").failed
    stored = zoo.open(root).sql("select distinct metric, higher_is_better from benchmark_results where task = 'by-loss'")
    assert dict(zip(stored["metric"], stored["higher_is_better"])) == {"loss": False, "score": True}
    ascending = benchmarks.leaderboard(zoo.open(root), "by-loss")
    assert list(ascending["loss"]) == [1.0, 3.0, 10.0] and list(ascending["rank"]) == [1, 2, 3]
    assert list(ascending["method"]) == ["linear(alpha=1.0)", "linear(alpha=3.0)", "linear(alpha=10.0)"]
    assert list(benchmarks.leaderboard(zoo.open(root), "by-score")["score"]) == [10.0, 3.0, 1.0]


def _result_values(root, task):
    rows = zoo.open(root).sql(f"select method, parameters_hash, unit, metric, value, status, phase, seed, settings "
                              f"from benchmark_results where task = '{task}' order by all")
    return rows


def test_zoo_bench_through_the_launcher_gives_the_in_process_rows(root, tmp_path, monkeypatch):
    """`zoo bench` runs its (method, unit) pairs as local jobs (2 workers, each a process of its
    own): the stored rows equal those of the in-process run, and a rerun computes nothing."""
    monkeypatch.setenv("ZOO_JOBS_DIR", str(tmp_path / "jobs"))
    task_path = _write(tmp_path / "mine.yaml", {**TASK, "methods": [{"method": "magnitude_global", "sweep": {"sparsity": [0.3, 0.6]}},
                                                                 {"method": "random", "parameters": {"sparsity": 0.5}}]})
    here = tmp_path / "here"
    shutil.copytree(root, here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a launched job runs
    try:
        report = run_task(zoo.open(here), load_task(task_path), "smoke")
    finally:
        torch.set_num_threads(threads)
    assert report.computed == 3 * 8 and not report.failed  # 3 calls x 8 models (the unit is a model)
    assert main(["bench", str(task_path), "--root", str(root), "--no-progress", "--workers", "2"]) == 0
    launched, in_process = _result_values(root, "mine"), _result_values(here, "mine")
    assert len(launched) == len(in_process) >= 24 and (launched["status"] == "ok").all()
    pd.testing.assert_frame_equal(launched, in_process)
    again = run_task(zoo.open(root), load_task(task_path), "smoke", options=LaunchOptions(workers=2))
    assert again.computed == 0 and again.reused == 24
    assert not list((tmp_path / "jobs").glob("*/*"))  # every job succeeded: its folder is gone
