"""catalog.yaml: the shipped zoos validate and expand; every malformed input is one clear line."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from zoo.catalog import load_catalog, parse_zoo
from zoo.cli import main
from zoo.errors import CatalogError

from .conftest import REPO

GOOD = {
    "description": "test zoo",
    "dataset": {"name": "digits"},
    "architecture": {"name": "mlp"},
    "load": {"name": "width", "values": [4, 8]},
    "temperature": {"name": "batch_size", "values": [16, 32, 64]},
    "seeds": [0, 1],
    "training": {"lr": 0.1, "epochs": 2},
    "checkpoints": [0, 2],
}


def with_change(path: str, value, delete: bool = False) -> dict:
    body = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return body


def test_shipped_catalog_has_the_promised_zoos():
    catalog = load_catalog(REPO / "catalog.yaml")
    smoke, digits = catalog["smoke"], catalog["digits-mlp"]
    assert smoke.grid_size <= 8
    assert len(digits.load.values) >= 6 and len(digits.temperature.values) >= 6 and len(digits.seeds) >= 3
    assert catalog["fmnist-cnn"].architecture["name"] == "cnn" and catalog["fmnist-cnn"].dataset["name"] == "fashion-mnist"
    assert catalog["teacher-student"].load.name == "train_size"
    for zoo in catalog:
        assert 0 in zoo.checkpoints and zoo.training.epochs in zoo.checkpoints


def test_grid_expands_axes_into_the_right_sections():
    zoo = parse_zoo("t", GOOD)
    specs = zoo.models()
    assert len(specs) == zoo.grid_size == 12
    assert {s.architecture["width"] for s in specs} == {4, 8}
    assert {s.training.batch_size for s in specs} == {16, 32, 64}
    assert len({s.model_id for s in specs}) == 12
    assert specs[0].input_shape == [1, 8, 8] and specs[0].n_classes == 10


def test_model_id_is_stable_and_ignores_spelled_out_defaults():
    plain = parse_zoo("t", GOOD).models()
    explicit = parse_zoo("t", with_change("architecture.depth", 2)).models()
    assert [s.model_id for s in plain] == [s.model_id for s in explicit]
    changed = parse_zoo("t", with_change("training.lr", 0.2)).models()
    assert plain[0].model_id != changed[0].model_id


def test_data_size_axis_sets_the_dataset_option():
    body = with_change("load", {"name": "train_size", "values": [100, 200]})
    body["architecture"]["width"] = 16
    specs = parse_zoo("t", body).models()
    assert {s.dataset["train_size"] for s in specs} == {100, 200}


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("training.lrr", 0.1, "training.lrr"),  # unknown field
        ("surprise", 1, "surprise"),  # unknown top-level field
        ("training.lr", "fast", "training.lr"),  # wrong type
        ("training.lr", -1, "training.lr"),  # out of range
        ("load.values", [], "load.values"),  # empty axis
        ("temperature.values", [16, 16], "temperature.values"),  # repeated values
        ("seeds", [], "seeds"),
        ("dataset.name", "imagenet", "dataset.name"),  # unknown dataset
        ("architecture.name", "transformer9", "architecture.name"),  # unknown architecture
        ("architecture.widthh", 3, "architecture.widthh"),  # unknown architecture option
        ("load.name", "colour", "load.name"),  # not a hyperparameter
        ("checkpoints", [1, 2], "checkpoints"),  # no epoch 0
        ("checkpoints", [0, 1], "checkpoints"),  # no final epoch
        ("load.values", [4, -8], "load.values"),  # invalid width at one grid point
    ],
)
def test_malformed_zoo_names_zoo_and_field(path, value, field):
    with pytest.raises(CatalogError) as info:
        parse_zoo("broken", with_change(path, value))
    message = str(info.value)
    assert "'broken'" in message and field in message
    assert "\n" not in message


def test_missing_required_field_is_named():
    with pytest.raises(CatalogError, match=r"'broken'.*'training'"):
        parse_zoo("broken", with_change("training", None, delete=True))


def test_cli_reports_bad_catalog_in_one_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"zoos": {"mine": with_change("training.epochs", "many")}}))
    assert main(["catalog", "--catalog", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error:") and "'mine'" in err and "training.epochs" in err
    assert len(err.splitlines()) == 1


def test_cli_reports_invalid_yaml_and_wrong_top_level(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("zoos: [unclosed\n")
    assert main(["catalog", "--catalog", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text(textwrap.dedent("models: {}\n"))
    assert main(["catalog", "--catalog", str(bad)]) == 2
    assert "zoos:" in capsys.readouterr().err


def test_unknown_zoo_lists_the_known_ones(tmp_path, capsys):
    assert main(["generate", "no-such-zoo", "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no-such-zoo" in err and "smoke" in err and "digits-mlp" in err


def test_catalog_env_variable_selects_the_catalog(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"zoos": {"only-mine": GOOD}}))
    monkeypatch.setenv("ZOO_CATALOG", str(mine))
    assert main(["catalog", "--root", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "only-mine" in out and "smoke" not in out


@pytest.mark.parametrize("where,value", [("training.lr", float("inf")), ("training.momentum", float("nan")),
                                         ("metrics.hessian.trace_tol", float("inf")), ("dataset.test_fraction", float("-inf"))])
def test_a_number_that_is_not_finite_is_one_line_naming_the_field(where, value):
    body = yaml.safe_load((REPO / "catalog.yaml").read_text())["zoos"]["smoke"]
    section, *rest = where.split(".")
    target = body.setdefault(section, {})
    for key in rest[:-1]:
        target = target.setdefault(key, {})
    target[rest[-1]] = value
    with pytest.raises(CatalogError) as e:
        parse_zoo("smoke", body)
    assert str(e.value).startswith("catalog: zoo 'smoke', field ") and where in str(e.value) and "finite" in str(e.value)


def test_a_name_key_inside_a_zoo_is_one_line():
    body = dict(yaml.safe_load((REPO / "catalog.yaml").read_text())["zoos"]["smoke"], name="other")
    with pytest.raises(CatalogError, match="field 'name': not a setting"):
        parse_zoo("smoke", body)
