"""Where each stage's outputs live: ``<workdir>/<stage>/<key>``, the key a hash of everything the
stage's result depends on, all read off its row of the stage table:

- the values of its config keys (as loaded: presets resolved), except those that only say where or
  how a stage runs (:data:`RUN_ONLY_KEYS`);
- the contents of the files its config names (sources, a tokenizer.json, an init checkpoint): each
  file's path, size and modification time;
- its code: the lm modules named in its row and every lm module they import, and its own
  function, compared by tokens (an edited comment or a rewrapped line changes nothing);
- the keys of the stages it reads.

Same inputs, same folder: that is what makes reruns skip finished stages, lets a killed training
run resume from its own checkpoints, and recomputes exactly what a change affects.

A stage that can extend an earlier output of its own (ingest and clean, on a retrain whose files
changed) finds it with :func:`earlier_output`: the newest finished folder of the stage made by the
same pipeline (``name``) with the same code and the same config keys, except those that only say
which files to read (:func:`lineage`). The folder is only read, never changed.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import inspect
import io
import json
import sys
import sysconfig
import textwrap
import tokenize
import types
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lm.config import Config
from lm.data import sources
from lm.pipeline.stage import MANIFEST, Stage, is_complete, wanted

# Keys that say where or how a stage runs, never what it produces: no key includes them. (The
# others are each some stage's input: tests/test_workspace.py checks that none is forgotten.)
RUN_ONLY_KEYS = (
    "data.workers",
    "data.dask_address",
    "pretrain.resume",
    "finetune.resume",
    "align.resume",
    "trainer.log_every",
)
# Keys about the run as a whole (its name, where outputs and records go, when the new-data trigger
# starts one), read by no stage.
RUN_KEYS = ("name", "workdir", "tracking", "retrain")
# Modules that never change what a stage produces: the config schema (its values are hashed
# instead), errors, file plumbing, tracking, and the table machinery itself.
NEUTRAL_MODULES = frozenset(
    {
        "lm",
        "lm.config",
        "lm.errors",
        "lm.pipeline.stage",
        "lm.stages",
        "lm.fileio",
        "lm.memory",
        "lm.tracking.client",
        "lm.tracking.metric_sender",
        "lm.tracking.runs",
        "lm.pipeline.workspace",
    }
)


def _hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = value


def config_values(cfg: Config, stage: Stage) -> dict[str, Any]:
    """The stage's config keys, flattened to dotted names with their loaded values (JSON types)."""
    flat: dict[str, Any] = {}
    for key in stage.config:
        _flatten(cfg.value(key), key, flat)
    return {k: v for k, v in flat.items() if not k.startswith(RUN_ONLY_KEYS)}


def fingerprint(spec: str | None, key: str) -> Any:
    """Path, size and modification time of every file behind a config value that names files
    (a path, folder, glob, ``stdlib`` or ``hf:``), in the order ingest reads them."""
    if spec is None:
        return None
    if spec == sources.STDLIB:
        return f"stdlib\0{sys.version}\0{sysconfig.get_paths()['stdlib']}"
    if spec.startswith(sources.HF_PREFIX):
        return spec
    h = hashlib.sha256()
    for sf in sources.resolve(spec, key):
        st = sf.path.stat()
        h.update(f"{sf.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def files_fingerprint(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    out = {}
    for key in keys:
        out[key] = [fingerprint(s, key) for s in sources.file_specs(cfg.value(key))]
    return out


LM_ROOT = Path(__file__).resolve().parent.parent  # the lm package


def _module_file(name: str) -> Path | None:
    """The source file of an lm module, found by path (nothing is imported)."""
    parts = name.split(".")
    if parts[0] != "lm":
        return None
    base = LM_ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


# Code is read as tokens and bytecode, never as `ast` objects: building those is not thread-safe on
# CPython 3.11 (gh-106905: the AST constructor's recursion counter is shared by all threads, so a
# parse in Prefect's event-loop thread can make ours fail with "AST constructor recursion depth
# mismatch"). Neither `tokenize` nor `compile` to bytecode builds them.
_LAYOUT = frozenset({tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER})


def source_digest(text: str) -> str:
    """Hash of Python source as its tokens: comments, blank lines and line breaks inside brackets
    change nothing; a change of indentation (a block's extent) or of any other token does."""
    h = hashlib.sha256()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL):
            continue
        h.update(f"{tok.type}\0{'' if tok.type in _LAYOUT else tok.string}\n".encode())
    return h.hexdigest()


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _lm_imports(code: types.CodeType, module: str, is_package: bool) -> set[str]:
    """Names of the lm modules a module's code imports, at top level or inside functions: read off
    its bytecode, where every import statement is ``LOAD_CONST level; LOAD_CONST fromlist;
    IMPORT_NAME module``."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for obj in _code_objects(code):
        ops = list(dis.get_instructions(obj))
        for i, op in enumerate(ops):
            if op.opname != "IMPORT_NAME":
                continue
            level = ops[i - 2].argval if i >= 2 and ops[i - 2].opname == "LOAD_CONST" else 0
            names = ops[i - 1].argval if i >= 1 and ops[i - 1].opname == "LOAD_CONST" else None
            base = op.argval
            if level:  # relative import
                parent = package.rsplit(".", level - 1)[0] if level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.split(".")[0] != "lm":
                continue
            found.add(base)
            for name in names or ():  # `from lm import tokenizer`: a submodule, not a name
                if name != "*" and _module_file(f"{base}.{name}") is not None:
                    found.add(f"{base}.{name}")
    return found


@functools.cache
def _module_code(name: str) -> tuple[str, tuple[str, ...]]:
    """(digest of the module's source tokens, the lm modules it imports)."""
    path = _module_file(name)
    if path is None:
        return "", ()
    text = path.read_text(encoding="utf-8")
    code = compile(text, str(path), "exec", dont_inherit=True)
    return source_digest(text), tuple(sorted(_lm_imports(code, name, path.name == "__init__.py")))


def module_closure(roots: Iterable[str]) -> list[str]:
    """The lm modules ``roots`` stand for and everything they import from lm (a root that is a
    package stands for all its modules: methods loaded by name are found that way)."""
    todo, seen = [], set()
    for root in roots:
        path = _module_file(root)
        todo.append(root)
        if path is not None and path.name == "__init__.py":
            todo += [f"{root}.{p.stem}" for p in sorted(path.parent.glob("*.py")) if p.stem != "__init__"]
    while todo:
        name = todo.pop()
        if name in seen or name in NEUTRAL_MODULES:
            continue
        seen.add(name)
        todo.extend(_module_code(name)[1])
    return sorted(seen)


def code_digest(stage: Stage) -> str:
    """Hash of the stage's code: its modules' closure (:func:`module_closure`) and its own function."""
    parts = [(name, _module_code(name)[0]) for name in module_closure(stage.code)]
    try:
        own = source_digest(textwrap.dedent(inspect.getsource(stage.run)))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):  # no source (a builtin): its name
        own = f"{stage.run.__module__}.{stage.run.__qualname__}"
    return _hash(parts, own)


def stage_keys(cfg: Config, stages: Sequence[Stage]) -> dict[str, str]:
    """Each stage's key; ``stages`` in table order (every stage after the ones it reads); a stage
    this config leaves out (:func:`lm.pipeline.stage.wanted`) has none."""
    keys: dict[str, str] = {}
    for stage in wanted(stages, cfg):
        keys[stage.name] = _hash(
            stage.name,
            config_values(cfg, stage),
            files_fingerprint(cfg, stage.files),
            None if stage.fingerprint is None else stage.fingerprint(cfg),
            code_digest(stage),
            [keys[name] for name in stage.inputs],
        )
    return keys


def stage_dirs(cfg: Config, stages: Sequence[Stage]) -> dict[str, Path]:
    """Every given stage's output folder: ``<workdir>/<stage>/<key>``."""
    root = Path(cfg.workdir).expanduser().resolve()
    return {name: root / name / key for name, key in stage_keys(cfg, stages).items()}


LINEAGE = "lineage.json"


def lineage(cfg: Config, stage: Stage, varying: Sequence[str] = ()) -> str:
    """What an earlier output of ``stage`` must share with this run for the stage to extend it
    instead of starting over: the pipeline name, the stage's code and its config keys except
    ``varying`` (those that only say which files to read). A changed filter, seed or split
    fraction is another lineage: that run rebuilds everything."""
    values = {k: v for k, v in config_values(cfg, stage).items() if not k.startswith(tuple(varying))}
    return _hash(cfg.name, stage.name, values, code_digest(stage))


def earlier_output(cfg: Config, stage: Stage, ident: str, current: Path) -> Path | None:
    """The newest finished output folder of ``stage`` in the work folder, other than ``current``,
    whose :data:`LINEAGE` says ``ident``; None if there is none."""
    root = Path(cfg.workdir).expanduser().resolve() / stage.name
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith(".") or folder.resolve() == Path(current).resolve() or not is_complete(folder):
            continue
        try:
            if json.loads((folder / LINEAGE).read_text()).get("lineage") != ident:
                continue
            found.append(((folder / MANIFEST).stat().st_mtime_ns, folder.name, folder))
        except (OSError, ValueError):  # an older layout, or removed meanwhile
            continue
    return max(found)[2] if found else None


def write_lineage(out_dir: Path, ident: str, extends: Path | None) -> None:
    """Mark a stage's output with its lineage (and the folder it extended), for the next run."""
    (Path(out_dir) / LINEAGE).write_text(json.dumps({"lineage": ident, "extends": None if extends is None else str(extends)}))
