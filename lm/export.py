"""Export: one self-contained folder (safetensors weights, model config, tokenizer, labels, card)
that the registry, the server and other tools load without lmforge's training code or pickles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lm.stage import StageResult

EXPORT_FILES = ("model.safetensors", "model.json")


def export(
    finetune_dir: Path, pretrain_dir: Path, tokens_dir: Path, ft_data_dir: Path, *, out_dir: Path
) -> StageResult:
    from lm.model import count_params, load_model

    finetune_dir, pretrain_dir, tokens_dir = Path(finetune_dir), Path(pretrain_dir), Path(tokens_dir)
    for name in EXPORT_FILES:
        shutil.copy2(finetune_dir / name, out_dir / name)
    backbone = out_dir / "lm"
    backbone.mkdir()
    for name in EXPORT_FILES:
        shutil.copy2(pretrain_dir / name, backbone / name)
    shutil.copy2(tokens_dir / "tokenizer.json", out_dir / "tokenizer.json")
    shutil.copy2(tokens_dir / "index.json", out_dir / "tokens_index.json")
    shutil.copy2(Path(ft_data_dir) / "labels.json", out_dir / "labels.json")

    # Load what was written, as a consumer would, and run it once: an export that cannot be
    # loaded must fail here, not at deploy time.
    model = load_model(out_dir)
    lm = load_model(backbone)
    seq = min(8, model.args.seq_len)
    with torch.no_grad():
        idx = torch.zeros(1, seq, dtype=torch.long)
        logits, _ = model(idx, torch.ones(1, seq, dtype=torch.bool))
        lm_logits, _ = lm(idx)
    labels = json.loads((out_dir / "labels.json").read_text())
    if logits.shape[-1] != len(labels):
        raise RuntimeError(f"exported classifier has {logits.shape[-1]} outputs but {len(labels)} labels")
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    (out_dir / "README.md").write_text(
        "# lmforge model\n\n"
        f"- classifier: `model.safetensors` + `model.json`, {count_params(model):,} parameters, labels in `labels.json`\n"
        f"- language model backbone: `lm/`, {count_params(lm):,} parameters, vocabulary {lm_logits.shape[-1]}\n"
        "- tokenizer: `tokenizer.json` (Hugging Face `tokenizers`)\n\n"
        "Load with `lm.model.load_model(folder)`; serve with `lmforge deploy` (MLflow registry).\n"
    )
    return StageResult(
        metrics={"export/size_mb": size / 1e6, "export/params": float(count_params(model))},
        artifacts=["model.json", "labels.json", "README.md"],
        outputs={"model": ".", "lm": "lm"},
    )
