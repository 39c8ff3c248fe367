"""Classification: a linear head on the pretrained backbone's pooled hidden state.

Data: ``train/val/test.parquet`` with (text, label) and ``labels.json`` (lm.data.labelled: the
stdlib docstring -> package task, or the user's labelled file). Texts are encoded one way only
(:func:`encode_texts`): training, evaluation and prediction all call it. Metrics: accuracy and
macro-F1 on the test split beside the majority-class baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lm.config import Config
from lm.data.labelled import LABELS, SPLIT_FILES, build_finetune_data
from lm.datamodule import EpochSampler, ResumableDataModule, ResumableLoader
from lm.errors import DataError
from lm.finetune import Recipe
from lm.lit import OptimisedModule
from lm.model import SequenceClassifier, count_params, load_model
from lm.shards import TokenIndex
from lm.stage import StageResult
from lm.tokenizer import load_tokenizer

METRICS = {"eval/accuracy": "max", "eval/macro_f1": "max"}


def prepare_data(cfg: Config, *, out_dir: Path) -> StageResult:
    return build_finetune_data(cfg, out_dir=out_dir)


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


class ClassificationDataModule(ResumableDataModule):
    """``train/val.parquet`` (text, label) -> (ids (B,T), attention_mask (B,T) bool, labels (B,)).
    Training examples come in a new seeded order each epoch, split over ranks, resumable mid-epoch."""

    def __init__(self, data_dir: Path, tokenizer, seq_len: int, batch_size: int, seed: int, pad_id: int):
        super().__init__()
        self.data_dir, self.tokenizer = Path(data_dir), tokenizer
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, seed, pad_id
        self.label_names = read_labels(self.data_dir)
        self._sets: dict[str, TensorDataset] = {}

    def split(self, name: str) -> TensorDataset:
        if name not in self._sets:
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
            ids, mask = encode_texts(
                self.tokenizer, df["text"].astype(str).tolist(), self.seq_len, self.pad_id
            )
            self._sets[name] = TensorDataset(ids, mask, labels)
        return self._sets[name]

    def setup(self, stage: str | None = None) -> None:
        self.split("train")
        self.split("val")

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        self.train_sampler = EpochSampler(len(self.split("train")), self.seed, rank, world)
        return ResumableLoader(self.split("train"), batch_size=self.batch_size, sampler=self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()  # every example once over all ranks; the module sums over ranks
        val = self.split("val")
        return DataLoader(Subset(val, range(rank, len(val), world)), batch_size=self.batch_size)


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
        module=ClassifierModule(net, f, freeze_backbone=f.freeze_backbone),
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


def evaluate(model_dir: Path, data_dir: Path, tokens_dir: Path, *, out_dir: Path) -> dict[str, float]:
    """Accuracy and macro-F1 on the test split, beside the majority-class baseline; writes the
    confusion matrix and a sample of predictions."""
    predictor = Predictor(model_dir, tokenizer_path=Path(tokens_dir) / TokenIndex.load(tokens_dir).tokenizer)
    labels = predictor.labels
    train = pd.read_parquet(Path(data_dir) / SPLIT_FILES["train"])
    test = pd.read_parquet(Path(data_dir) / SPLIT_FILES["test"])
    y_true = test["label"].to_numpy()
    y_pred = predictor.probabilities(test["text"].tolist()).argmax(-1)
    majority = int(train["label"].value_counts().idxmax())
    baseline = np.full_like(y_true, majority)
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
        "eval/macro_f1": macro_f1(y_true, y_pred, len(labels)),
        "eval/baseline_accuracy": float(np.mean(baseline == y_true)),
        "eval/baseline_macro_f1": macro_f1(y_true, baseline, len(labels)),
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
