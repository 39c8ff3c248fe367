"""The standard library's documented functions and classes, read in a process of their own.

Reading them needs ``ast`` syntax trees, and building those is not thread-safe on CPython 3.11
(gh-106905): the AST constructor's recursion counter is one per interpreter, so when Prefect's
event-loop thread parses a signature while a stage parses the stdlib, one of the two can fail
with "SystemError: AST constructor recursion depth mismatch". A stage therefore asks a child
interpreter (one thread, stdlib imports only) for the definitions, as JSON lines:
``python -m lm.data.pydefs [PACKAGE ...]``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from lm.data.sources import stdlib_files, stdlib_root


@dataclass
class Definition:
    package: str  # top-level package or module: email, asyncio, json ...
    module: str  # dotted module path: email.mime.text
    name: str  # qualified name inside the module: MIMEText.__init__
    signature: str  # "def __init__(self, _text, _subtype='plain', _charset=None)"
    docstring: str


def stdlib_definitions(packages: set[str] | None = None) -> list[Definition]:
    """Documented functions and classes of the stdlib (no tests, no private top-level modules),
    in sorted file order and source order inside a file; optionally only some packages."""
    args = ["--all"] if packages is None else sorted(packages)
    done = subprocess.run(
        [sys.executable, "-m", __name__, *args], capture_output=True, text=True, encoding="utf-8", check=False
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"reading the stdlib's definitions failed: {lines[-1] if lines else done.returncode}")
    return [Definition(**json.loads(line)) for line in done.stdout.splitlines()]


def _scan(packages: set[str] | None) -> Iterator[Definition]:
    root = stdlib_root()
    for path in stdlib_files(include_tests=False):
        rel = path.relative_to(root)
        package = rel.parts[0].removesuffix(".py")
        if package.startswith("_") or package in ("test", "site-packages"):
            continue
        if packages is not None and package not in packages:
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # lib2to3 test data and the like
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        yield from _definitions(tree, package, module, "")


def _definitions(node: ast.AST, package: str, module: str, prefix: str) -> Iterator[Definition]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                yield Definition(package, module, name, _signature(child), doc)
            yield from _definitions(child, package, module, f"{name}.")


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)})"


if __name__ == "__main__":
    wanted = None if sys.argv[1:] == ["--all"] else set(sys.argv[1:])
    out = sys.stdout
    for definition in _scan(wanted):
        out.write(json.dumps(asdict(definition)) + "\n")
