"""What every pipeline stage returns, and how its outputs reach disk atomically.

A stage function in ``lm/`` takes its inputs as paths and writes into an ``out_dir`` it is given.
It returns a :class:`StageResult`: the numbers to log, the files worth showing, and the named
outputs the next stage reads. :func:`run_stage` gives the function a temporary directory and
moves it into place only when the function returned, with ``manifest.json`` written last, so an
interrupted or failed stage never leaves a half-written output that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lm.errors import LmforgeError

MANIFEST = "manifest.json"


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # Paths relative to the stage's directory: logged as MLflow artifacts of the stage's run.
    artifacts: list[str] = field(default_factory=list)
    # Named paths relative to the stage's directory that later stages read.
    outputs: dict[str, str] = field(default_factory=dict)
    # Dataset lineage for mlflow.log_input: dicts with name, path (relative), digest, source, context.
    datasets: list[dict[str, Any]] = field(default_factory=list)

    def save(self, out_dir: Path) -> None:
        tmp = out_dir / f".{MANIFEST}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, out_dir / MANIFEST)

    @classmethod
    def load(cls, out_dir: Path) -> StageResult:
        return cls(**json.loads((Path(out_dir) / MANIFEST).read_text()))


def is_complete(out_dir: Path) -> bool:
    return (Path(out_dir) / MANIFEST).is_file()


def run_stage(fn: Callable[..., StageResult], out_dir: Path, *args: Any, **kwargs: Any) -> StageResult:
    """Run ``fn(*args, out_dir=tmp, **kwargs)`` and move ``tmp`` to ``out_dir`` once it succeeded."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        result = fn(*args, out_dir=tmp, **kwargs)
        result.save(tmp)
        if out_dir.exists():  # an earlier incomplete attempt, or a forced rerun
            shutil.rmtree(out_dir)
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
