"""Property-based fuzzing of catalog entries (hypothesis): every mutation of a shipped zoo's
settings either loads (and then round-trips) or is refused with one line that names the zoo
and the field; no other exception, no traceback."""

from __future__ import annotations

import copy
import json
import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo.catalog import CatalogError, load_catalog, parse_zoo

from .conftest import REPO

SHIPPED = yaml.safe_load((REPO / "catalog.yaml").read_text())["zoos"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=10),
                    st.sampled_from(["digits", "mlp", "cnn", "width", "batch_size", "lr", "sgd", "cosine", "relu"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)


def locations(body, prefix=()) -> list[tuple]:
    """Every key path into nested mappings and lists."""
    out = []
    items = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(body, list) else []
    for key, value in items:
        out.append(prefix + (key,))
        out += locations(value, prefix + (key,))
    return out


@st.composite
def mutated_zoo(draw) -> tuple[str, dict]:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    body = copy.deepcopy(SHIPPED[name])
    for _ in range(draw(st.integers(1, 3))):
        spots = locations(body)
        if not spots:
            break
        path = draw(st.sampled_from(spots))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        operation = draw(st.sampled_from(["delete", "replace", "add"]))
        if operation == "delete":
            del parent[path[-1]]
        elif operation == "replace":
            parent[path[-1]] = draw(values)
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
        else:
            parent.append(draw(values))
    return name, body


TRIED = {"loaded": 0, "refused": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_zoo())
def test_a_mutated_zoo_loads_or_is_refused_naming_zoo_and_field(case):
    name, body = case
    try:
        zoo = parse_zoo(name, body)
    except CatalogError as e:
        TRIED["refused"] += 1
        message = str(e)
        assert f"zoo {name!r}" in message and "\n" not in message and "Traceback" not in message
        assert re.search(r"field ['\"]", message) or "expected a mapping" in message, message  # a repr
        return
    TRIED["loaded"] += 1
    assert parse_zoo(name, json.loads(zoo.model_dump_json(exclude={"name"}))) == zoo  # round trip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_zoo())
def test_a_mutated_catalog_file_loads_or_is_one_clear_error(tmp_path_factory, case):
    name, body = case
    path = tmp_path_factory.mktemp("fuzz") / "catalog.yaml"
    path.write_text(yaml.safe_dump({"zoos": {name: body}}, allow_unicode=True))
    try:
        catalog = load_catalog(path)
    except CatalogError as e:
        assert str(path.name) in str(e) and "\n" not in str(e)
        return
    assert catalog[name].name == name


def test_the_fuzzing_exercised_both_outcomes():
    """(Runs after the property test in file order.) Both branches were taken many times."""
    assert TRIED["refused"] >= 50 and TRIED["loaded"] >= 5, TRIED
