"""The house: imports point one way (no loop among lm, flows and tasks, function-local imports
included), and a stage's cache key hashes its own code only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from lm.pipeline.workspace import module_closure
from lm.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lm", "flows", "tasks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            out[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in its text (function bodies too); a
    package importing its own submodules does not count (that is what a package's __init__ is)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".")[: len(m.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not t.startswith(m + "."):
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_loop_in_lm_flows_or_tasks():
    graph = import_graph()
    assert len(graph) > 60  # the walk saw the project
    assert cycles(graph) == []


def test_every_mlflow_call_lives_in_lm_tracking():
    """No module of lm, flows or tasks outside lm/tracking imports mlflow (function bodies too)."""
    outside = []
    for m, f in _modules().items():
        if m == "lm.tracking" or m.startswith("lm.tracking."):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            outside += [f"{m}: {n}" for n in names if n == "mlflow" or n.startswith("mlflow.")]
    assert outside == []


# Code a stage of each kind must not hash: an edit there must leave the stage cached.
TRAINING = ("lm.training.modules", "lm.training.child", "lm.training.pretrain_data", "lm.training.checkpoint")
GENERATION = ("lm.generation.sampling",)
SERVING = ("lm.serving",)
REGISTRY = ("lm.tracking.registry", "lm.tracking.pyfunc_model", "lm.tracking.runs", "lm.tracking.report",
            "lm.tracking.summary")
MODELS = ("lm.models",)


def _hashes(stage_name: str) -> list[str]:
    stage = next(s for s in STAGES if s.name == stage_name)
    return module_closure(stage.code)


@pytest.mark.parametrize("stage,foreign", [
    ("ingest", TRAINING + GENERATION + SERVING + REGISTRY + MODELS + ("lm.text",)),
    ("clean", TRAINING + GENERATION + SERVING + REGISTRY + MODELS + ("lm.text",)),
    ("tokenize", TRAINING + GENERATION + SERVING + REGISTRY + ("lm.models.transformer", "lm.models.hf")),
    ("finetune_data", TRAINING + GENERATION + SERVING + REGISTRY + MODELS),
    ("align_data", TRAINING + GENERATION + SERVING + REGISTRY + MODELS),
    # base_model reads the registry (models:/NAME@ALIAS) and writes a training result (use_as_pretrained).
    ("base_model", GENERATION + SERVING + ("lm.training.modules", "lm.training.child", "lm.training.pretrain_data", "lm.tracking.pyfunc_model", "lm.tracking.report")),
])
def test_a_data_stage_key_hashes_none_of_the_later_code(stage, foreign):
    hashed = _hashes(stage)
    print(stage, hashed)
    assert not [m for m in hashed for f in foreign if m == f or m.startswith(f + ".")]


def test_every_stage_key_is_listed():
    """What each stage's key hashes, for a reader (printed with -s), and a floor on what it must."""
    keys = {s.name: _hashes(s.name) for s in STAGES}
    for name, mods in keys.items():
        print(f"{name}: {', '.join(mods)}")
    assert "lm.data.ingest" in keys["ingest"] and "lm.text.tokenize_stage" in keys["tokenize"]
    assert "lm.training.child" in keys["pretrain"] and "lm.finetune.sft" in keys["finetune"]
    assert "lm.tracking.registry" in keys["deploy"]
