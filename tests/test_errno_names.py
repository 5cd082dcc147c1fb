"""Errnos are written by name (``errno.EINVAL``), never as numbers, in the broker, the SDK and the tests.

The source is read with :mod:`ast`: an integer literal where an errno goes — the
first argument of an error constructor, an ``errno=`` argument, or a comparison
with ``.errno`` — is reported with its file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TREES = ("broker", "client", "tests")

# Callables whose first argument is an errno.
ERROR_TYPES = {"BrokerError", "BrokerClientError", "OSError", "membuf_error"}


def _is_int(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _numeric_errnos(tree: ast.AST) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if _name(node.func) in ERROR_TYPES and node.args and _is_int(node.args[0]):
                yield node
            elif any(kw.arg and "errno" in kw.arg and _is_int(kw.value) for kw in node.keywords):
                yield node
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any("errno" in _name(side) for side in sides) and any(_is_int(side) for side in sides):
                yield node


def _sources(tree: str) -> list[Path]:
    return sorted(path for path in (REPOSITORY / tree).rglob("*.py") if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")))


@pytest.mark.parametrize("tree", TREES)
def test_errnos_are_spelled_by_name(tree: str) -> None:
    found = []
    for path in _sources(tree):
        text = path.read_text()
        lines = text.splitlines()
        for node in _numeric_errnos(ast.parse(text, str(path))):
            found.append(f"{path.relative_to(REPOSITORY)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not found, "errnos written as numbers (use the errno module's names):\n" + "\n".join(found)
