"""Evaluation: the language model on held-out tokens, the classifier on the held-out test split,
each beside a trivial baseline (a unigram model; the majority class) so a number is never shown
without the yardstick it has to beat.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lm.stage import StageResult


@torch.no_grad()
def language_model_metrics(
    model_dir: Path, tokens_dir: Path, seq_len: int, max_batches: int, batch_size: int = 8
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte (bpb: tokenizer-independent) of the decoder."""
    from lm.model import load_model
    from lm.shards import TokenShards
    from lm.tokenizer import load_tokenizer

    model = load_model(model_dir)
    val = TokenShards(tokens_dir, "val")
    train = TokenShards(tokens_dir, "train")
    tok = load_tokenizer(Path(tokens_dir) / "tokenizer.json")
    n_windows = min(val.num_windows(seq_len), max_batches * batch_size)
    if n_windows == 0:
        return {}
    # Unigram baseline, fitted on the training split (add-one smoothing over the vocabulary).
    counts = np.zeros(val.vocab_size, dtype=np.float64)
    step = 1 << 22
    for start in range(0, train.num_tokens, step):
        chunk = train.window(start, min(step, train.num_tokens - start))
        counts += np.bincount(chunk, minlength=val.vocab_size)[: val.vocab_size]
    unigram_logp = np.log((counts + 1) / (counts.sum() + val.vocab_size))

    nats = 0.0
    baseline_nats = 0.0
    n_tokens = 0
    n_bytes = 0
    for b0 in range(0, n_windows, batch_size):
        windows = [
            val.window(i * (seq_len + 1), seq_len + 1).astype(np.int64)
            for i in range(b0, min(b0 + batch_size, n_windows))
        ]
        batch = torch.from_numpy(np.stack(windows))
        x, y = batch[:, :-1], batch[:, 1:]
        logits, _ = model(x)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum"
        )
        nats += float(nll)
        baseline_nats += float(-unigram_logp[y.numpy()].sum())
        n_tokens += y.numel()
        for row in y.tolist():
            n_bytes += len(tok.decode(row, skip_special_tokens=False).encode("utf-8"))
    loss = nats / n_tokens
    return {
        "val/loss": loss,
        "val/ppl": math.exp(min(loss, 50.0)),
        "eval/bpb": nats / math.log(2) / max(n_bytes, 1),
        "eval/baseline_bpb": baseline_nats / math.log(2) / max(n_bytes, 1),
        "eval/tokens": float(n_tokens),
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    f1s = []
    for c in range(num_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        if tp + fp + fn == 0:
            continue  # class absent from both: no information either way
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def classifier_metrics(
    classifier_dir: Path, ft_data_dir: Path, tokens_dir: Path, seq_len: int, out_dir: Path
) -> dict[str, float]:
    """Accuracy and macro-F1 on the test split, beside the majority-class baseline."""
    from lm.model import load_model
    from lm.serving import class_probabilities
    from lm.shards import TokenShards
    from lm.tokenizer import load_tokenizer

    model = load_model(classifier_dir)
    tok = load_tokenizer(Path(tokens_dir) / "tokenizer.json")
    pad_id = TokenShards(tokens_dir, "train").pad_id
    labels = json.loads((Path(ft_data_dir) / "labels.json").read_text())
    train = pd.read_parquet(Path(ft_data_dir) / "train.parquet")
    test = pd.read_parquet(Path(ft_data_dir) / "test.parquet")
    y_true = test["label"].to_numpy()
    y_pred = class_probabilities(model, tok, test["text"].tolist(), seq_len, pad_id).argmax(-1)
    majority = int(train["label"].value_counts().idxmax())
    baseline = np.full_like(y_true, majority)
    k = len(labels)
    confusion = pd.crosstab(
        pd.Categorical([labels[i] for i in y_true], categories=labels),
        pd.Categorical([labels[i] for i in y_pred], categories=labels),
        rownames=["true"],
        colnames=["predicted"],
        dropna=False,
    )
    confusion.to_csv(out_dir / "confusion.csv")
    sample = test.assign(predicted=[labels[i] for i in y_pred], true=[labels[i] for i in y_true]).head(200)
    sample.drop(columns=["label"]).to_csv(out_dir / "predictions_sample.csv", index=False)
    return {
        "eval/accuracy": float(np.mean(y_pred == y_true)),
        "eval/macro_f1": macro_f1(y_true, y_pred, k),
        "eval/baseline_accuracy": float(np.mean(baseline == y_true)),
        "eval/baseline_macro_f1": macro_f1(y_true, baseline, k),
        "eval/test_examples": float(len(y_true)),
    }


def evaluate(
    pretrain_dir: Path,
    finetune_dir: Path,
    tokens_dir: Path,
    ft_data_dir: Path,
    seq_len: int,
    max_batches: int,
    *,
    out_dir: Path,
) -> StageResult:
    metrics = language_model_metrics(Path(pretrain_dir), Path(tokens_dir), seq_len, max_batches)
    metrics.update(
        classifier_metrics(Path(finetune_dir), Path(ft_data_dir), Path(tokens_dir), seq_len, out_dir)
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return StageResult(
        metrics=metrics,
        artifacts=["metrics.json", "confusion.csv", "predictions_sample.csv"],
        outputs={"metrics": "metrics.json"},
    )
