"""What a pipeline stage is, what it is given, what it returns, and how its outputs reach disk.

A :class:`Stage` is one row of the stage table (``lm/stages.py``): a name, the ``lm/`` function
that does the work, the stages whose outputs it reads, the config keys and files its result
depends on, and the files it must leave behind. Everything else (output folders and cache keys,
MLflow child runs and their params, the Prefect wiring, the CLI) is derived from the table.

The function receives a :class:`StageContext` and returns a :class:`StageResult`: the numbers to
log, the files worth showing, the named outputs. :func:`execute` gives it a temporary folder and
moves it into place only when the function returned and every declared output exists, with
``manifest.json`` written last, so an interrupted or failed stage never leaves a half-written
output that a later run would trust. A resumable stage (training) works in its final folder, where
its checkpoints survive a crash; its folder too counts as finished only once the manifest is there.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.errors import LmforgeError, StageError
from lm.fileio import atomic_write, remove_abandoned, temporary_name

if TYPE_CHECKING:
    from lm.config import Config

MANIFEST = "manifest.json"


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    # Facts the stage decided (a learned vocabulary's size, LSH bands); never a config key the
    # stage's run already holds with another value.
    params: dict[str, Any] = field(default_factory=dict)
    # Paths relative to the stage's directory: logged as MLflow artifacts of the stage's run.
    artifacts: list[str] = field(default_factory=list)
    # Named paths relative to the stage's directory (or values such as a model URI) for later stages.
    outputs: dict[str, str] = field(default_factory=dict)
    # Dataset lineage for mlflow.log_input: dicts with name, path (relative), digest, source, context.
    datasets: list[dict[str, Any]] = field(default_factory=list)
    # CSV files (relative paths) shown as tables in the MLflow UI (mlflow.log_table), e.g. generations.
    tables: list[str] = field(default_factory=list)
    # Tags of the stage's run: a decision and its reason (deploy's promotion), not numbers.
    tags: dict[str, str] = field(default_factory=dict)

    def save(self, out_dir: Path) -> None:
        atomic_write(Path(out_dir) / MANIFEST, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, out_dir: Path) -> StageResult:
        return cls(**json.loads((Path(out_dir) / MANIFEST).read_text()))


def run_subprocess(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run a command with this process's stdout/stderr (the default way a stage launches training);
    ``env`` is added to this process's environment."""
    rc = subprocess.run(cmd, check=False, env={**os.environ, **(env or {})}).returncode
    if rc:
        raise StageError(f"{' '.join(cmd[:4])} ... failed with exit code {rc}")


@dataclass
class StageContext:
    """What a stage function is given."""

    cfg: Config
    inputs: dict[str, Path]  # upstream stage name -> its (finished) output folder
    out_dir: Path  # where to write; moved into place when the stage is complete
    run_id: str | None = None  # the stage's MLflow run (training logs live metrics into it), if tracked
    # How to run a child process (training), ``launch(cmd, env)``: the orchestrator passes one that
    # streams its output into the run's log; outside it, a plain subprocess.
    launch: Callable[[list[str], dict[str, str] | None], None] = run_subprocess
    # ``cluster_map(fn, items, shared) -> [fn(item, shared) ...]`` on a cluster (data.dask_address),
    # given by the orchestrator; None: the stage maps its work over this machine's cores.
    cluster_map: Callable[[Callable, list, Any], list] | None = None


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str
    run: Callable[[StageContext], StageResult]
    help: str
    inputs: tuple[str, ...] = ()  # stages whose output folders ``run`` reads
    # Dotted config keys (or whole sections) the result depends on: they enter the cache key and
    # are the stage run's params. Keys that only say where or how to run never do (RUN_ONLY_KEYS).
    config: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # config keys naming input files/folders: their contents enter the key
    code: tuple[str, ...] = ()  # lm modules (and what they import from lm) whose source enters the key
    outputs: tuple[str, ...] = ()  # files the stage must leave in its folder to count as finished
    resumable: bool = False  # works in its final folder (checkpoints survive a crash)
    cached: bool = True  # False: runs every time (the registry may have moved since)
    live_metrics: bool = False  # logs its metrics into its run while it runs
    group: str | None = None  # CLI command that runs the whole group (``lmforge data``)
    check: Callable[[Config], None] | None = None  # checks before any stage runs (preflight)
    # What else the result depends on, found when the key is made (the version an alias points at).
    fingerprint: Callable[[Config], Any] | None = None
    # A config key: the stage is part of a run only where its value is set (align: ``align.task``);
    # elsewhere it has no folder, no key, no run, and the stages that read it read what they would
    # without it.
    when: str | None = None

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")


def stage_by_name(table: Sequence[Stage], name: str) -> Stage:
    for stage in table:
        if stage.name == name:
            return stage
    raise KeyError(name)


def wanted(table: Sequence[Stage], cfg: Config) -> list[Stage]:
    """The rows of ``table`` that ``cfg`` runs (see :attr:`Stage.when`), none of them reading a row left out."""
    off = {s.name for s in table if s.when is not None and not cfg.value(s.when)}
    return [replace(s, inputs=tuple(n for n in s.inputs if n not in off)) for s in table if s.name not in off]


def needed(table: Sequence[Stage], targets: Sequence[str]) -> list[Stage]:
    """The stages of ``table`` (in table order) that ``targets`` need: themselves and their inputs."""
    wanted, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(stage_by_name(table, name).inputs)
    return [s for s in table if s.name in wanted]


def is_complete(out_dir: Path) -> bool:
    return (Path(out_dir) / MANIFEST).is_file()


def _check_outputs(stage: Stage, work: Path, result: StageResult) -> None:
    declared = list(stage.outputs) + [v for v in result.outputs.values() if not _is_uri(v)]
    missing = [name for name in declared if not (work / name).exists()]
    if missing:
        raise StageError(f"stage {stage.name} finished without writing {', '.join(missing)} in {work}")


def _is_uri(value: str) -> bool:
    return "://" in value or value.startswith("models:/")


# What the machine, not the input, can make a stage fail with: a full disk, a read-only folder.
_MACHINE_ERRNOS = {errno.ENOSPC: "free some space (or point workdir elsewhere)", errno.EDQUOT: "free some space",
                   errno.EROFS: "point workdir at a writable folder", errno.EACCES: "make the work folder writable"}


def execute(stage: Stage, ctx: StageContext) -> StageResult:
    """Run ``stage.run(ctx)`` so that ``ctx.out_dir`` appears only complete (see module docstring).
    A full disk or a folder it may not write is one clear error; nothing half-written is published."""
    try:
        return _execute(stage, ctx)
    except OSError as e:
        code = _errno(e)
        if code not in _MACHINE_ERRNOS:
            raise
        raise StageError(
            f"stage {stage.name}: {os.strerror(code)} ({e.filename or ctx.out_dir}): {_MACHINE_ERRNOS[code]}, "
            "then rerun; the stages that finished are kept and reused"
        ) from None


def _errno(e: OSError) -> int | None:
    # Arrow's I/O errors are OSErrors that carry the errno only in their message.
    if e.errno is not None:
        return e.errno
    found = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)
    return int(found.group(1)) if found else None


def _execute(stage: Stage, ctx: StageContext) -> StageResult:
    out_dir = Path(ctx.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out_dir.parent)  # what a killed run of any stage folder here left
    if stage.resumable:
        out_dir.mkdir(exist_ok=True)
        remove_abandoned(out_dir)
        (out_dir / MANIFEST).unlink(missing_ok=True)  # a forced rerun: not finished until it is
        result = stage.run(ctx)
        _check_outputs(stage, out_dir, result)
        result.save(out_dir)
        return result
    tmp = out_dir.parent / temporary_name(out_dir.name)
    tmp.mkdir()
    try:
        result = stage.run(replace(ctx, out_dir=tmp))
        _check_outputs(stage, tmp, result)
        result.save(tmp)
        if stage.cached and (out_dir / MANIFEST).is_file():
            # Another run with the same key finished first (two runs at once): its folder is as good
            # as ours and that run may be reading it now, so it stays and ours goes.
            return StageResult.load(out_dir)
        if out_dir.exists():  # an earlier incomplete attempt, or a stage that always reruns
            # Moved aside before it is removed: the folder's name is missing only between two renames.
            old = out_dir.parent / temporary_name(out_dir.name)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except LmforgeError as e:
        # Bad input: keep what the stage wrote (dropped samples, stats) where a person can read it,
        # under a name no later run trusts as a finished output.
        failed = out_dir.with_name(out_dir.name + ".failed")
        if any(tmp.iterdir()):
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)
            e.args = (f"{e.args[0] if e.args else e} [partial outputs kept in {failed}]", *e.args[1:])
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result
