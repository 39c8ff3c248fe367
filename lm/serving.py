"""Inference on an exported folder: what the registry's pyfunc and (later) the HTTP server call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def class_probabilities(model, tokenizer, texts: list[str], seq_len: int, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """(N, num_classes) probabilities of a classifier, inputs encoded exactly as in training."""
    from lm.datamodule import encode_texts

    out = []
    for i in range(0, len(texts), batch_size):
        idx, mask = encode_texts(tokenizer, texts[i : i + batch_size], seq_len, pad_id)
        logits, _ = model(idx, mask)
        out.append(torch.softmax(logits.float(), -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_classes))


class TextClassifier:
    """Label texts with an exported lmforge classifier folder."""

    def __init__(self, folder: str | Path):
        from lm.model import load_model
        from lm.tokenizer import load_tokenizer

        folder = Path(folder)
        self.model = load_model(folder)
        self.tokenizer = load_tokenizer(folder / "tokenizer.json")
        index = json.loads((folder / "tokens_index.json").read_text())
        spec = json.loads((folder / "model.json").read_text())
        self.pad_id = int(index["pad_id"])
        self.seq_len = int(spec["args"]["seq_len"])
        self.labels: list[str] = json.loads((folder / "labels.json").read_text())

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return class_probabilities(self.model, self.tokenizer, texts, self.seq_len, self.pad_id)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(texts).argmax(-1)]
