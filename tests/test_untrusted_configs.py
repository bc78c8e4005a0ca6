"""A zoo root may come from anyone, and it stores each model's full config, from which the API
builds the model and loads the data set. A config out of bounds (a depth of ten million, a width
or a test set of 1e12) or over the parameter or data budget is refused in one line naming the
model and the field, before anything is built or loaded; a data set `path` stored in a config is
never followed; and the catalog refuses the same things (seeds included) naming zoo and field."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from zoo.api import Root
from zoo.architectures import ARCHITECTURES, build_model
from zoo.catalog import CatalogError, parse_zoo
from zoo.datasets import _load_cached
from zoo.errors import ZooError

from .conftest import REPO

SMOKE = yaml.safe_load((REPO / "catalog.yaml").read_text())["zoos"]["smoke"]


def tampered(smoke_root, tmp_path, edit, **columns):
    """A copy of the smoke root whose first model's stored config is `edit`ed (and its other
    `columns` set: a value, or a function of the edited config), with the manifest rewritten to
    match, as a careful attacker would. Returns (root, model id)."""
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    part = next((root / "tables" / "models" / "smoke").glob("pack-*.parquet"))
    table = pq.read_table(part)
    config = json.loads(table.column("config")[0].as_py())
    edit(config)
    for name, value in {"config": json.dumps(config), **columns}.items():
        values = table.column(name).to_pylist()
        values[0] = value(config) if callable(value) else value
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
    pq.write_table(table, part)
    manifest = part.parent / ".checksums"
    data = part.read_bytes()
    lines = [line for line in manifest.read_text().splitlines() if not line.endswith("\t" + part.name)]
    manifest.write_text("\n".join(lines + [f"{hashlib.sha256(data).hexdigest()}\t{len(data)}\t{part.name}"]) + "\n")
    return root, table.column("model_id")[0].as_py()


def refused(call, model_id: str, field: str) -> str:
    with pytest.raises(ZooError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and model_id in message and field in message, message
    return message


def built_params(config: dict) -> int:
    """The parameters of the model a config describes, built for real (a small one)."""
    model = build_model(config["architecture"], config["input_shape"], config["n_classes"])
    return sum(p.numel() for p in model.parameters())


def set_path(config: dict, *keys_and_value):
    *keys, value = keys_and_value
    for key in keys[:-1]:
        config = config[key]
    config[keys[-1]] = value


def test_a_stored_depth_of_ten_million_is_refused_at_once_without_memory(smoke_root, tmp_path):
    root, model_id = tampered(smoke_root, tmp_path, lambda c: set_path(c, "architecture", "depth", 10_000_000))
    z = Root(root)
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    message = refused(lambda: z.load_model(model_id), model_id, "architecture.depth")
    assert time.monotonic() - start < 5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 500e6  # ru_maxrss: KiB
    assert "10000000" in message and "1000" in message
    refused(lambda: z.data(model_id), model_id, "architecture.depth")


def test_a_stored_width_of_1e12_is_refused_in_one_line(smoke_root, tmp_path):
    root, model_id = tampered(smoke_root, tmp_path, lambda c: set_path(c, "architecture", "width", 1e12))
    refused(lambda: Root(root).load_model(model_id), model_id, "architecture.width")


def test_a_model_within_every_bound_but_over_the_parameter_budget_is_refused(smoke_root, tmp_path, monkeypatch):
    def huge(config):
        config["architecture"].update(width=100_000, depth=1000)  # 1e13 parameters

    root, model_id = tampered(smoke_root, tmp_path, huge)
    message = refused(lambda: Root(root).load_model(model_id), model_id, "architecture")
    assert "budget" in message and "ZOO_MAX_PARAMS" in message
    # the budget is the user's: below the smoke models' sizes, even they are refused
    monkeypatch.setenv("ZOO_MAX_PARAMS", "1000")
    z = Root(smoke_root)
    sizes = dict(z.sql("select model_id, n_params from models").itertuples(index=False))
    small, large = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    assert sizes[small] < 1000 < sizes[large]
    assert z.load_model(small) is not None
    refused(lambda: z.load_model(large), large, "budget")


def teacher_student(test_size):
    def edit(config):
        config["dataset"] = {"name": "teacher-student", "n_features": 32, "n_classes": 10, "teacher_width": 64,
                             "train_size": 4096, "test_size": test_size, "label_noise": 0.0, "data_seed": 0}
        config.update(input_shape=[32], n_classes=10)
    return edit


def test_a_stored_test_size_of_1e13_is_refused_in_one_line(smoke_root, tmp_path):
    root, model_id = tampered(smoke_root, tmp_path, teacher_student(1e13))
    refused(lambda: Root(root).data(model_id), model_id, "dataset.test_size")


def test_a_generated_data_set_over_the_data_budget_is_refused(smoke_root, tmp_path):
    root, model_id = tampered(smoke_root, tmp_path, teacher_student(10**8), n_params=built_params)
    message = refused(lambda: Root(root).data(model_id), model_id, "dataset")
    assert "budget" in message and "ZOO_MAX_DATA_VALUES" in message


def test_a_stored_input_shape_or_parameter_count_that_disagrees_is_refused(smoke_root, tmp_path):
    root, model_id = tampered(smoke_root, tmp_path / "a", lambda c: c.update(input_shape=[1, 100_000, 100_000]))
    refused(lambda: Root(root).load_model(model_id), model_id, "input_shape")
    root, model_id = tampered(smoke_root, tmp_path / "b", lambda c: set_path(c, "architecture", "width", 5))
    refused(lambda: Root(root).load_model(model_id), model_id, "parameters")


def test_a_stored_seed_of_1e29_is_refused(smoke_root, tmp_path):
    root, model_id = tampered(smoke_root, tmp_path, lambda c: c.update(seed=10**29))
    refused(lambda: Root(root).load_model(model_id), model_id, "seed")


def write_cifar10(folder, label: int):
    """A CIFAR-10 binary folder with one record per file, every label `label`."""
    folder.mkdir()
    record = np.concatenate([[label], np.full(3072, label, dtype=np.uint8)]).astype(np.uint8).tobytes()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(record)


def test_a_stored_data_set_path_is_never_followed(smoke_root, tmp_path, monkeypatch):
    outside, default = tmp_path / "outside", tmp_path / "default"
    write_cifar10(outside, 7)
    write_cifar10(default, 3)
    monkeypatch.setenv("ZOO_CIFAR10", str(default))
    _load_cached.cache_clear()

    def cifar(config):
        config["dataset"] = {"name": "cifar10", "train_size": None, "path": str(outside)}
        config.update(input_shape=[3, 32, 32], n_classes=10)

    root, model_id = tampered(smoke_root, tmp_path, cifar, n_params=built_params)
    z = Root(root)
    opened = []
    real_fromfile = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda path, *a, **k: opened.append(str(path)) or real_fromfile(path, *a, **k))
    assert z.data(model_id).y_test.tolist() == [3]  # the default location, not the stored path
    assert opened and not any(str(outside) in p for p in opened), opened
    assert z.data(model_id, path=outside).y_test.tolist() == [7]  # a path the user passes is used
    with pytest.raises(ZooError, match="takes no path"):
        Root(smoke_root).data(model_id, path=outside)
    _load_cached.cache_clear()


@pytest.mark.parametrize("seeds", [[10**29], [2**63], [-1]])
def test_the_catalog_refuses_seeds_outside_0_to_2_63(seeds):
    with pytest.raises(CatalogError) as e:
        parse_zoo("smoke", {**SMOKE, "seeds": seeds})
    assert "\n" not in str(e.value) and "zoo 'smoke'" in str(e.value) and "field 'seeds.0'" in str(e.value)
    parse_zoo("smoke", {**SMOKE, "seeds": [0, 2**63 - 1]})


@pytest.mark.parametrize("change, field", [
    ({"architecture": {"name": "mlp", "depth": 10_000_000}}, "field 'architecture.depth'"),
    ({"load": {"name": "width", "values": [8, 1e12]}}, "field 'load.values' (width=1000000000000.0)"),
    ({"architecture": {"name": "mlp", "depth": 1000}, "load": {"name": "width", "values": [8, 100_000]}},
     "field 'load.values' (width=100000)"),  # in bounds, over the parameter budget
    ({"dataset": {"name": "teacher-student", "test_size": 10**13}}, "field 'dataset.test_size'"),
    ({"dataset": {"name": "teacher-student", "test_size": 10**8}}, "field 'load.values'"),  # over the data budget
])
def test_the_catalog_refuses_what_a_stored_config_may_not_hold(change, field):
    with pytest.raises(CatalogError) as e:
        parse_zoo("smoke", {**SMOKE, **change})
    assert "\n" not in str(e.value) and "zoo 'smoke'" in str(e.value) and field in str(e.value), str(e.value)


def test_every_shipped_model_is_within_the_bounds_and_budgets():
    from zoo.architectures import MAX_PARAMS
    from zoo.catalog import load_catalog

    largest = max(spec.count_parameters() for zoo in load_catalog(REPO / "catalog.yaml") for spec in zoo.models())
    assert 100e6 < largest <= MAX_PARAMS  # the paper-scale ResNet-50s are in the catalog and within budget


@pytest.mark.parametrize("name, options, shape, n_classes", [
    ("mlp", {"width": 7, "depth": 3}, (1, 8, 8), 10),
    ("mlp", {"width": 5, "depth": 1}, (32,), 3),
    ("cnn", {"width": 3, "depth": 3, "batchnorm": False, "kernel_size": 5}, (3, 32, 32), 10),
    ("cnn", {"width": 4, "depth": 2}, (1, 8, 8), 10),
    ("resnet", {"width": 2, "depth": 18}, (3, 32, 32), 10),
    ("resnet", {"width": 3, "depth": 50}, (1, 28, 28), 100),
    ("vit", {"width": 16, "depth": 2, "heads": 4, "patch_size": 4, "mlp_ratio": 3}, (3, 32, 32), 10),
    ("vit", {"width": 12, "depth": 1, "heads": 3, "patch_size": 8}, (3, 64, 64), 200),
])
def test_the_counted_parameters_are_those_the_built_model_has(name, options, shape, n_classes):
    arch = ARCHITECTURES[name]
    built = build_model({"name": name, **options}, shape, n_classes)
    assert arch.count(arch.options(**options), shape, n_classes) == sum(p.numel() for p in built.parameters())
