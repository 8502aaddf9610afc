"""No function in model/ or service/ is longer than 60 lines (nested functions count in their enclosing one): a
function that long does several jobs, each of which deserves a name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def _functions(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO).as_posix(), node


@pytest.mark.parametrize("package", ["model", "service"])
def test_no_function_is_over_60_lines(package):
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions(package) if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, long
