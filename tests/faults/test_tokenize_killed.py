"""SIGKILL while the tokenize stage writes its shards: no partial shard or index is ever visible
as a finished output, and the rerun writes shards byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm.config import load_config
from lm.pipeline.stage import StageContext, execute, is_complete, stage_by_name
from lm.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["data.max_docs=null", "tokenizer.train_max_mb=2", "tokenizer.shard_tokens=200000"]
TOKENIZE = (
    "import sys\n"
    "from pathlib import Path\n"
    "from lm.config import load_config\n"
    "from lm.pipeline.stage import StageContext, execute, stage_by_name\n"
    "from lm.stages import STAGES\n"
    "cfg = load_config('tiny', sys.argv[3:])\n"
    "inputs = {'clean': Path(sys.argv[1]), 'base_model': Path(sys.argv[1]).parent / 'base_model'}\n"
    "execute(stage_by_name(STAGES, 'tokenize'), StageContext(cfg, inputs, Path(sys.argv[2])))\n"
)


@pytest.mark.slow  # ~45 s: the whole stdlib cleaned, then tokenized three times
def test_killed_tokenize_publishes_nothing_and_the_rerun_is_byte_identical(tmp_path):
    cfg = load_config("tiny", OVERRIDES)
    execute(stage_by_name(STAGES, "ingest"), StageContext(cfg, {}, tmp_path / "ingest"))
    execute(
        stage_by_name(STAGES, "clean"), StageContext(cfg, {"ingest": tmp_path / "ingest"}, tmp_path / "clean")
    )
    execute(stage_by_name(STAGES, "base_model"), StageContext(cfg, {}, tmp_path / "base_model"))
    inputs = {"clean": tmp_path / "clean", "base_model": tmp_path / "base_model"}

    out = tmp_path / "tokenize" / "key"
    proc = subprocess.Popen(
        [sys.executable, "-c", TOKENIZE, str(tmp_path / "clean"), str(out), *OVERRIDES],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once it is half-way through writing train shards
        if len(list(out.parent.glob(".key.tmp-*/train_*.bin"))) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (abandoned,) = out.parent.glob(".key.tmp-*")
    assert not out.exists() and not is_complete(out)
    assert not (abandoned / "index.json").exists()  # the index is written after every shard

    execute(stage_by_name(STAGES, "tokenize"), StageContext(cfg, inputs, out))
    assert is_complete(out) and not abandoned.exists()  # the killed run's leftovers are gone
    reference = tmp_path / "reference"
    execute(stage_by_name(STAGES, "tokenize"), StageContext(cfg, inputs, reference))
    files = sorted(p.name for p in reference.iterdir() if p.name != "manifest.json")
    assert sum(name.startswith("train_") for name in files) > 3
    assert files == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
