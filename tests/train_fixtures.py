"""Small real inputs for the training tests, in the data stage's formats (index.json + .bin, parquet).

Text comes from a few modules of the Python standard library (always present, real code), the
tokenizer is a byte-level BPE trained on it in well under a second.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np

STDLIB = Path(sys.modules["json"].__file__).parent.parent
SOURCES = ["json/encoder.py", "json/decoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py"]


def pretrain_args(cfg: Path, tokens: Path, out: Path, *extra: str) -> list[str]:
    """``-m lm.train pretrain ...``: the entry point's arguments as the pipeline's task passes them
    (after ``python`` or after a ``torchrun`` prefix)."""
    return [
        "-m",
        "lm.train",
        "pretrain",
        "--config",
        str(cfg),
        "--data",
        str(tokens),
        "--out",
        str(out),
        *extra,
    ]


def child_env() -> dict[str, str]:
    """Environment of a training subprocess in tests: unbuffered output, and one thread everywhere (the
    same float reduction order in every process; two threads on a busy 2-core box wait on each other).
    No MLFLOW_RUN_ID from the caller: it would make MLflow resume the wrong run (mlflow#15713)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def stdlib_texts() -> list[str]:
    return [(STDLIB / s).read_text(encoding="utf-8") for s in SOURCES]


def make_token_dir(root: Path, vocab_size: int = 384, train_files: int = 2) -> Path:
    """A token data dir: tokenizer.json, index.json, train_0000N.bin, val_00000.bin (uint16)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|pad|>", "<|mask|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = stdlib_texts()
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(root / "tokenizer.json"))
    eot, pad, mask = (tok.token_to_id(s) for s in specials)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids + [eot])
    arr = np.asarray(ids, dtype=np.uint16)
    n_val = len(arr) // 10
    val, train = arr[:n_val], arr[n_val:]
    parts = np.array_split(train, train_files)
    files = []
    for i, part in enumerate(parts):
        name = f"train_{i:05d}.bin"
        part.tofile(root / name)
        files.append(name)
    val.tofile(root / "val_00000.bin")
    index = {
        "dtype": "uint16",
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot,
        "pad_id": pad,
        "mask_id": mask,
        "splits": {
            "train": {"files": files, "tokens": int(len(train))},
            "val": {"files": ["val_00000.bin"], "tokens": int(len(val))},
        },
        "tokenizer": "tokenizer.json",
    }
    (root / "index.json").write_text(json.dumps(index, indent=2))
    return root


def make_finetune_dir(root: Path) -> Path:
    """Classify a line of code by the module it comes from (3 classes): train/val/test.parquet + labels.json."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    names = ["textwrap", "shlex", "glob"]
    rows = []
    for label, name in enumerate(names):
        lines = [
            ln.strip() for ln in (STDLIB / f"{name}.py").read_text().splitlines() if len(ln.strip()) > 20
        ]
        rows += [{"text": ln, "label": label} for ln in lines[:60]]
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    n = len(rows)
    splits = {
        "train": rows[: int(0.7 * n)],
        "val": rows[int(0.7 * n) : int(0.85 * n)],
        "test": rows[int(0.85 * n) :],
    }
    for split, part in splits.items():
        pd.DataFrame(part).to_parquet(root / f"{split}.parquet")
    (root / "labels.json").write_text(json.dumps(names))
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
