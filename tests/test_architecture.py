"""The direction of dependence: zoo/ is the ground floor; generators/ and metrics/ stand on it
and not on each other. Only the command-line entry point imports every stage."""

from __future__ import annotations

import ast

import pytest

from .conftest import REPO

STAGES = {"generators", "metrics", "benchmarks"}
ALLOWED = {"zoo": set(), "generators": {"zoo"}, "metrics": {"zoo"}, "benchmarks": {"zoo", "metrics"}}


def imported_packages(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_they_stand_on(package):
    for path in sorted((REPO / package).glob("*.py")) if (REPO / package).is_dir() else []:
        if package == "zoo" and path.name == "cli.py":
            continue  # the entry point
        wrong = (imported_packages(path) & (STAGES | {"zoo"})) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


# The storage layer: the only modules that open Parquet files, build part paths or know the
# layout of a root (zoo.sql reads through DuckDB's views, which storage creates).
STORAGE_LAYER = {"zoo/storage.py", "zoo/packing.py", "zoo/integrity.py", "zoo/matrices.py", "zoo/verify.py",
                 "zoo/publish.py", "zoo/published.py", "zoo/pull.py"}
PARQUET_MODULES = {"pyarrow.parquet", "pyarrow.dataset"}
# private names of other libraries that the project subclasses or calls, each for a reason
FOREIGN_PRIVATE = {"_BatchNorm", "_exit"}
KNOWN: dict[str, set[str]] = {}  # module -> further private names it may use (none left)


def _modules():
    for package in [*sorted(ALLOWED), "perf"]:
        yield from sorted((REPO / package).glob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_storage_layer_opens_parquet_and_no_private_name_crosses_a_module(path):
    """No module outside the storage layer imports a Parquet reader or builds a part path, and
    no module uses another module's private name (`x._name`, `from m import _name`)."""
    relative = str(path.relative_to(REPO))
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        if relative not in STORAGE_LAYER:
            if isinstance(node, ast.Import) and {a.name for a in node.names} & PARQUET_MODULES:
                problems.append(f"line {node.lineno}: imports a Parquet reader")
            if isinstance(node, ast.ImportFrom) and node.module in PARQUET_MODULES:
                problems.append(f"line {node.lineno}: imports a Parquet reader")
            if isinstance(node, ast.Attribute) and node.attr == "part_path":
                problems.append(f"line {node.lineno}: builds a part path")
        if isinstance(node, ast.ImportFrom):
            problems += [f"line {node.lineno}: imports {node.module}.{a.name}" for a in node.names
                         if a.name.startswith("_") and not a.name.startswith("__") and a.name not in FOREIGN_PRIVATE]
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and node.attr not in FOREIGN_PRIVATE | KNOWN.get(relative, set())):
            problems.append(f"line {node.lineno}: uses the private name {ast.unparse(node)}")
    assert not problems, f"{relative}: " + "; ".join(problems)
