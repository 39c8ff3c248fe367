"""A fine-tuning method that exists only in the tests: regress the length of a line of code
(log10 of its characters) from the pretrained backbone. It implements the interface of
``lm/finetune`` in one module and is registered by two lines (``METHODS["length"] = __name__``,
``DATA["length"] = f"{__name__}:prepare_data"``) and a config block of its own (``finetune.length``,
tests/test_finetune_methods.py); nothing else in lmforge knows it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from lm.finetune import Recipe
from lm.finetune.classify import encode_texts
from lm.models.folder import load_model
from lm.models.transformer import SequenceClassifier
from lm.pipeline.stage import StageResult
from lm.text.shards import TokenIndex
from lm.text.tokenizer import load_tokenizer
from lm.training.modules import OptimisedModule

METRICS = {"eval/mae": "min"}
TOKEN_METRICS: frozenset[str] = frozenset()  # measured on the targets, not on tokens
STDLIB = Path(json.__file__).parent.parent


def prepare_data(cfg, *, out_dir: Path) -> StageResult:
    lines = [
        ln.strip() for name in ("textwrap.py", "shlex.py") for ln in (STDLIB / name).read_text().splitlines()
    ]
    lines = [ln for ln in lines if len(ln) > 3][:300]
    frame = pd.DataFrame({"text": lines, "target": [math.log10(len(ln)) for ln in lines]})
    splits = {"train": frame.iloc[:200], "val": frame.iloc[200:250], "test": frame.iloc[250:]}
    for name, part in splits.items():
        part.to_parquet(out_dir / f"{name}.parquet")
    return StageResult(metrics={"finetune_data/train": 200.0}, outputs={"train": "train.parquet"})


class LengthModule(OptimisedModule):
    def batch_loss(self, batch) -> torch.Tensor:
        ids, mask, y = batch
        return torch.nn.functional.mse_loss(self.net(ids, mask)[0][:, 0], y)

    def validation_step(self, batch, batch_idx: int) -> None:
        ids, mask, y = batch
        self._errors.append((self.net(ids, mask)[0][:, 0] - y).abs())

    def on_validation_epoch_start(self) -> None:
        self._errors = []

    def on_validation_epoch_end(self) -> None:
        mae = float(torch.cat(self._errors).mean())
        self.last_val, self.last_val_step = {"val/mae": mae}, self.global_step
        self.log("val/mae", mae)


class LengthData(pl.LightningDataModule):
    def __init__(self, data_dir: Path, tokens_dir: Path, seq_len: int, batch_size: int):
        super().__init__()
        index = TokenIndex.load(tokens_dir)
        self.tokenizer, self.pad_id = load_tokenizer(Path(tokens_dir) / index.tokenizer), index.pad_id
        self.data_dir, self.seq_len, self.batch_size = data_dir, seq_len, batch_size

    def split(self, name: str) -> TensorDataset:
        frame = pd.read_parquet(self.data_dir / f"{name}.parquet")
        ids, mask = encode_texts(self.tokenizer, frame["text"].tolist(), self.seq_len, self.pad_id)
        return TensorDataset(ids, mask, torch.tensor(frame["target"].to_numpy(), dtype=torch.float32))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.split("train"),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.split("val"), batch_size=self.batch_size)


def build(cfg, backbone, data_dir: Path, tokens_dir: Path) -> Recipe:
    f = cfg.finetune
    dm = LengthData(data_dir, tokens_dir, backbone.args.seq_len, f.batch_size)
    net = SequenceClassifier(backbone, 1)  # one output: the predicted log10 length
    return Recipe(
        LengthModule(net, f),
        dm,
        f.batch_size * backbone.args.seq_len,
        "line-length regression",
        meta={"target": "log10(characters)"},
        train_examples=200,
    )


def evaluate(model_dir: Path, data_dir: Path, tokenizer_path: Path, *, base_dir=None, out_dir: Path, settings=None) -> dict[str, float]:
    test = pd.read_parquet(data_dir / "test.parquet")
    predicted = Predictor(model_dir, tokenizer_path).predict(test)["log10_chars"].to_numpy()
    target = test["target"].to_numpy()
    mean = pd.read_parquet(data_dir / "train.parquet")["target"].mean()
    return {
        "eval/mae": float(np.abs(predicted - target).mean()),
        "eval/baseline_mae": float(np.abs(mean - target).mean()),
    }


def export(model_dir: Path, data_dir: Path, *, out_dir: Path) -> list[str]:
    (out_dir / "target.json").write_text(json.dumps({"target": "log10 of the line's characters"}))
    return ["target.json"]


class Predictor:
    def __init__(self, folder: Path, tokenizer_path: Path | None = None):
        self.model = load_model(folder)
        self.tokenizer = load_tokenizer(tokenizer_path or Path(folder) / "tokenizer.json")

    @torch.no_grad()
    def predict(self, inputs: pd.DataFrame, params=None) -> pd.DataFrame:
        ids, mask = encode_texts(
            self.tokenizer, inputs["text"].tolist(), self.model.args.seq_len, int(self.model.meta["pad_id"])
        )
        return pd.DataFrame({"log10_chars": self.model(ids, mask)[0][:, 0].numpy()})

    @staticmethod
    def input_example() -> pd.DataFrame:
        return pd.DataFrame({"text": ["return x"]})
