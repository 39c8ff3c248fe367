"""Classification: a linear head on the pretrained backbone's pooled hidden state.

Data: ``train/val/test.parquet`` with (text, label) and ``labels.json`` (lm.data.labelled: the
stdlib docstring -> package task, or the user's labelled file). Texts are encoded one way only
(:func:`encode_texts`): training, evaluation and prediction all call it. Metrics: accuracy and
macro-F1 on the test split beside two baselines, the majority class and TF-IDF + logistic
regression; per-class scores and the confusion matrix as files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lm.config import Config, EvaluateConfig
from lm.data.labelled import LABELS, SPLIT_FILES
from lm.errors import DataError
from lm.finetune import Recipe
from lm.finetune.splits import SplitDataModule
from lm.models.folder import load_model
from lm.models.transformer import SequenceClassifier, count_params
from lm.text.shards import TokenIndex
from lm.text.tokenizer import load_tokenizer
from lm.training.modules import OptimisedModule

METRICS = {"eval/accuracy": "max", "eval/macro_f1": "max"}
TOKEN_METRICS: frozenset[str] = frozenset()  # labels are compared, not tokens


def encode_texts(tokenizer, texts: list[str], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> ids (N, T) right-padded with pad_id, attention_mask (N, T) bool (True = real token)."""
    ids = torch.full((len(texts), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.bool)
    for i, enc in enumerate(tokenizer.encode_batch(texts)):
        row = enc.ids[:seq_len] or [pad_id]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def read_labels(data_dir: Path) -> list[str]:
    path = Path(data_dir) / LABELS
    if not path.is_file():
        raise DataError(f"{path} does not exist: give the finetune_data stage's output folder")
    return json.loads(path.read_text())


class ClassificationDataModule(SplitDataModule):
    """``train/val.parquet`` (text, label) -> (ids (B,T), attention_mask (B,T) bool, labels (B,))."""

    def __init__(self, data_dir: Path, tokenizer, seq_len: int, batch_size: int, seed: int, pad_id: int):
        super().__init__(data_dir, batch_size, seed)
        self.tokenizer, self.seq_len, self.pad_id = tokenizer, seq_len, pad_id
        self.label_names = read_labels(self.data_dir)

    def encode(self, name: str) -> TensorDataset:
        path = self.data_dir / SPLIT_FILES[name]
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        df = pd.read_parquet(path)
        for col in ("text", "label"):
            if col not in df.columns:
                raise DataError(f"{path} has no column {col!r} (columns: {list(df.columns)})")
        labels = torch.tensor(df["label"].to_numpy(), dtype=torch.long)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise DataError(f"{path}: labels must lie in [0, {len(self.label_names)}) ({LABELS})")
        ids, mask = encode_texts(self.tokenizer, df["text"].astype(str).tolist(), self.seq_len, self.pad_id)
        return TensorDataset(ids, mask, labels)


class ClassifierModule(OptimisedModule):
    """Fine-tuning of a SequenceClassifier: batches are (ids, attention_mask, labels)."""

    def __init__(self, net: SequenceClassifier, train, freeze_backbone: bool = False):
        super().__init__(net, train)
        if freeze_backbone:
            for p in net.backbone.parameters():
                p.requires_grad_(False)

    def batch_loss(self, batch) -> torch.Tensor:
        ids, mask, labels = batch  # (B, T), (B, T), (B,)
        return self.net(ids, mask, labels)[1]

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx: int) -> None:
        ids, mask, labels = batch
        logits, loss = self.net(ids, mask, labels)
        n = labels.numel()
        correct = (logits.argmax(-1) == labels).sum()
        self._val_sum += torch.stack(
            [loss.double() * n, correct.double(), torch.tensor(n, dtype=torch.float64, device=self.device)]
        )

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        n = float(total[2].clamp(min=1))
        self.last_val = {"val/loss": float(total[0]) / n, "val/accuracy": float(total[1]) / n}
        self.last_val_step = self.global_step
        self.log("val/loss", self.last_val["val/loss"], prog_bar=True, sync_dist=True)
        self.log("val/accuracy", self.last_val["val/accuracy"], prog_bar=True, sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            print(
                f"lmforge: step {self.global_step} val/loss {self.last_val['val/loss']:.4f} "
                f"val/accuracy {self.last_val['val/accuracy']:.4f}",
                flush=True,
            )


def build(cfg: Config, backbone: nn.Module, data_dir: Path, tokens_dir: Path) -> Recipe:
    f, args = cfg.finetune, backbone.args
    index = TokenIndex.load(tokens_dir)
    tokenizer = load_tokenizer(Path(tokens_dir) / index.tokenizer)
    dm = ClassificationDataModule(data_dir, tokenizer, args.seq_len, f.batch_size, f.seed, index.pad_id)
    net = SequenceClassifier(backbone, len(dm.label_names))
    if not args.tie_embeddings:
        # The LM head plays no part in classification; frozen, DDP does not wait for its gradient.
        backbone.lm_head.weight.requires_grad_(False)
    n_train = len(dm.split("train"))
    return Recipe(
        module=ClassifierModule(net, f, freeze_backbone=f.classify.freeze_backbone),
        datamodule=dm,
        tokens_per_batch=f.batch_size * args.seq_len,
        describe=f"{len(dm.label_names)}-class classifier, {count_params(net) / 1e6:.2f}M params, "
        f"{n_train} train examples",
        meta={"labels": dm.label_names},
        train_examples=n_train,
    )


@torch.no_grad()
def class_probabilities(
    model, tokenizer, texts: list[str], seq_len: int, pad_id: int, batch_size: int = 64
) -> np.ndarray:
    """(N, num_classes) probabilities, inputs encoded exactly as in training."""
    out = []
    for i in range(0, len(texts), batch_size):
        idx, mask = encode_texts(tokenizer, texts[i : i + batch_size], seq_len, pad_id)
        logits, _ = model(idx, mask)
        out.append(torch.softmax(logits.float(), -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_classes))


# scikit-learn and matplotlib are imported inside the evaluation functions: the registered model
# imports this module to predict, and its requirements (lm/tracking/registry.py: REQUIREMENTS) have neither.


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean F1 over the classes present in y_true or y_pred (a class absent from both says
    nothing either way)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro"))


def tfidf_predictions(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Test labels from TF-IDF character n-grams + logistic regression fitted on the train split:
    the cheap classifier a fine-tuned model has to beat, beyond the majority class."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    # Character n-grams inside words need no choice of tokenizer and fit code identifiers and any
    # script; regularisation at the library default, nothing tuned on the test split. Demo (1.7k
    # train texts, 8 classes): ~1.5 s on one core.
    baseline = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True),
        LogisticRegression(max_iter=1000, random_state=0),
    )
    baseline.fit(train["text"].astype(str).tolist(), train["label"].to_numpy())
    return baseline.predict(test["text"].astype(str).tolist())


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One row per label: precision, recall, F1 (0 where undefined) and support on the test split."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(labels))), zero_division=0
    )
    scores = pd.DataFrame({"precision": precision, "recall": recall, "f1": f1}).round(4)
    return pd.DataFrame({"label": labels}).join(scores).assign(support=support)


def plot_confusion(confusion: pd.DataFrame, path: Path) -> None:
    """The confusion matrix as a PNG: counts in the cells, colour = share of the true class's
    examples, so that a small class's errors show as clearly as a large one's."""
    from matplotlib.figure import Figure  # no pyplot: its global state is not safe in Prefect's threads

    counts = confusion.to_numpy()  # (true, predicted)
    n = len(counts)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 2.5 + 0.6 * n)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_xticks(range(n), [str(c) for c in confusion.columns], rotation=45, ha="right")
    ax.set_yticks(range(n), [str(i) for i in confusion.index])
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix, test split ({int(counts.sum())} examples)")
    fontsize = 10 if n <= 12 else 7
    for (i, j), count in np.ndenumerate(counts):
        colour = "white" if share[i, j] > 0.5 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=fontsize)
    fig.savefig(path, dpi=100)


def evaluate(
    model_dir: Path,
    data_dir: Path,
    tokenizer_path: Path,
    *,
    base_dir: Path | None = None,
    out_dir: Path,
    settings: EvaluateConfig | None = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 on the test split, beside the majority-class and TF-IDF baselines;
    writes per-class scores, the confusion matrix (table and picture) and a sample of predictions."""
    predictor = Predictor(model_dir, tokenizer_path=tokenizer_path)
    labels = predictor.labels
    train = pd.read_parquet(Path(data_dir) / SPLIT_FILES["train"])
    test = pd.read_parquet(Path(data_dir) / SPLIT_FILES["test"])
    y_true = test["label"].to_numpy()
    y_pred = predictor.probabilities(test["text"].tolist()).argmax(-1)
    majority = int(train["label"].value_counts().idxmax())
    baseline = np.full_like(y_true, majority)
    tfidf = tfidf_predictions(train, test)
    confusion = pd.crosstab(
        pd.Categorical([labels[i] for i in y_true], categories=labels),
        pd.Categorical([labels[i] for i in y_pred], categories=labels),
        rownames=["true"],
        colnames=["predicted"],
        dropna=False,
    )
    confusion.to_csv(out_dir / "confusion.csv")
    plot_confusion(confusion, out_dir / "confusion.png")
    per_class_scores(y_true, y_pred, labels).to_csv(out_dir / "per_class.csv", index=False)
    sample = test.assign(predicted=[labels[i] for i in y_pred], true=[labels[i] for i in y_true]).head(200)
    sample.drop(columns=["label"]).to_csv(out_dir / "predictions_sample.csv", index=False)
    return {
        "eval/accuracy": float(np.mean(y_pred == y_true)),
        "eval/macro_f1": macro_f1(y_true, y_pred),
        "eval/baseline_accuracy": float(np.mean(baseline == y_true)),
        "eval/baseline_macro_f1": macro_f1(y_true, baseline),
        "eval/tfidf_accuracy": float(np.mean(tfidf == y_true)),
        "eval/tfidf_macro_f1": macro_f1(y_true, tfidf),
        "eval/test_examples": float(len(y_true)),
    }


def export(model_dir: Path, data_dir: Path, *, out_dir: Path) -> list[str]:
    """The label names, for a person reading the folder (model.json carries them too)."""
    (Path(out_dir) / LABELS).write_text(json.dumps(read_labels(data_dir), indent=2))
    return [LABELS]


class Predictor:
    """Label texts with an exported classifier folder (model.safetensors, model.json, tokenizer.json)."""

    def __init__(self, folder: str | Path, tokenizer_path: str | Path | None = None):
        folder = Path(folder)
        self.model = load_model(folder)
        self.tokenizer = load_tokenizer(Path(tokenizer_path) if tokenizer_path else folder / "tokenizer.json")
        self.pad_id = int(self.model.meta["pad_id"])
        self.seq_len = self.model.args.seq_len
        self.labels: list[str] = list(self.model.meta["labels"])

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return class_probabilities(self.model, self.tokenizer, texts, self.seq_len, self.pad_id)

    def predict(self, inputs: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """A ``text`` column in; the label and its probability out."""
        probs = self.probabilities(inputs["text"].astype(str).tolist())
        return pd.DataFrame({"label": [self.labels[i] for i in probs.argmax(-1)], "score": probs.max(-1)})

    @staticmethod
    def input_example() -> pd.DataFrame:
        return pd.DataFrame({"text": ["Return the JSON encoding of obj."]})
