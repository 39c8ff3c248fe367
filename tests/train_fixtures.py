"""Small real inputs for the training tests, in the data stage's formats (index.json + .bin, parquet).

Text comes from a few modules of the Python standard library (always present, real code), the
tokenizer is a byte-level BPE trained on it in well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sys.modules["json"].__file__).parent.parent
SOURCES = ["json/encoder.py", "json/decoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py"]


def pretrain_args(cfg: Path, tokens: Path, out: Path, *extra: str) -> list[str]:
    """``-m lm.training.child pretrain ...``: the entry point's arguments as the pipeline's task passes them
    (after ``python`` or after a ``torchrun`` prefix)."""
    return [
        "-m",
        "lm.training.child",
        "pretrain",
        "--config",
        str(cfg),
        "--data",
        str(tokens),
        "--out",
        str(out),
        *extra,
    ]


def finetune_args(cfg: Path, data: Path, tokens: Path, init: Path, out: Path, *extra: str) -> list[str]:
    """``-m lm.training.child finetune ...`` as the pipeline's task passes it."""
    return [
        "-m",
        "lm.training.child",
        "finetune",
        "--config",
        str(cfg),
        "--data",
        str(data),
        "--tokens",
        str(tokens),
        "--init",
        str(init),
        "--out",
        str(out),
        *extra,
    ]


def run_training(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python <args>`` in a fresh process from the repository root; it must succeed."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_lmforge(*args: str) -> subprocess.Popen:
    """``lmforge ARGS`` in a fresh process from the repository root; stdout and stderr together."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env={**child_env(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def child_env() -> dict[str, str]:
    """Environment of a training subprocess in tests: unbuffered output, and one thread everywhere (the
    same float reduction order in every process; two threads on a busy 2-core box wait on each other).
    No MLFLOW_RUN_ID from the caller: it would make MLflow resume the wrong run (mlflow#15713)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def stdlib_texts() -> list[str]:
    return [(STDLIB / s).read_text(encoding="utf-8") for s in SOURCES]


def make_token_dir(root: Path, vocab_size: int = 384, shard_tokens: int = 12_000) -> Path:
    """A token data dir made by the real tokenize stage: a byte-level BPE on six stdlib modules
    (``json/encoder.py`` held out for validation), train shards cut small so windows cross files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lm.config import Config, TokenizerConfig
    from lm.text.tokenize_stage import tokenize

    clean = root.parent / f"{root.name}-clean"
    clean.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts()
    for split, docs in (("train", texts[1:]), ("val", texts[:1])):
        ids = [f"{split}{i}" for i in range(len(docs))]
        pq.write_table(
            pa.table({"doc_id": ids, "source": ["stdlib"] * len(docs), "text": docs}),
            clean / f"{split}.parquet",
        )
    root.mkdir(parents=True, exist_ok=True)
    cfg = Config(tokenizer=TokenizerConfig(kind="bpe", vocab_size=vocab_size, shard_tokens=shard_tokens))
    tokenize(cfg, clean, out_dir=root)
    return root


def make_finetune_dir(root: Path) -> Path:
    """Classify a line of code by the module it comes from (3 classes), built by the real
    classification data step from a labelled .jsonl file."""
    from lm.config import Config, FinetuneConfig
    from lm.data.labelled import build_finetune_data

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ["textwrap", "shlex", "glob"]:
        lines = [
            ln.strip() for ln in (STDLIB / f"{name}.py").read_text().splitlines() if len(ln.strip()) > 20
        ]
        rows += [{"text": ln, "label": name} for ln in lines[:60]]
    labelled = root.parent / f"{root.name}.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = Config(finetune=FinetuneConfig(data=str(labelled), val_fraction=0.15, test_fraction=0.15))
    build_finetune_data(cfg, out_dir=root)
    return root


def tiny_config_yaml(path: Path, **sections: dict) -> Path:
    """A full config for a tiny CPU run; ``sections`` override keys per section."""
    import yaml

    base = {
        "model": {"preset": "tiny", "seq_len": 32},
        "pretrain": {
            "max_steps": 12,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 2,
            "val_every": 6,
            "val_batches": 2,
            "ckpt_every": 4,
            "keep_last": 2,
            "seed": 7,
        },
        "finetune": {"max_steps": 10, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "seed": 7},
        "trainer": {"accelerator": "cpu", "devices": 1, "log_every": 2},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(base))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_at_checkpoint(args: list[str], step: int, env: dict[str, str] | None = None) -> list:
    """Start ``python <args>`` and SIGKILL it as soon as it reports the checkpoint of ``step``;
    returns the training processes it had started (DDP's other ranks), as psutil processes."""
    import psutil

    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=env or child_env())
    ranks = []
    try:
        for line in proc.stdout:
            if "saved checkpoint" in line and f"step-{step:08d}.ckpt" in line:
                # Saving is collective: every rank is up by now.
                ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                         if "lm.training.child" in " ".join(p.cmdline())]
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # it ended before the checkpoint line: the assertion below says so
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended (exit {proc.returncode}) before step {step}"
    return ranks
