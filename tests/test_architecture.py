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
