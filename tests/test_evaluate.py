"""Evaluation by model kind, under eval/ names, and the promotion metric's direction checked early."""

from __future__ import annotations

import json
import random

import matplotlib.image
import pandas as pd
import pytest
import torch
from train_fixtures import make_token_dir

from lm.config import ModelConfig, load_config
from lm.data.labelled import LABELS, SPLIT_FILES
from lm.errors import ConfigError
from lm.finetune import classify
from lm.models.folder import build_model, save_model
from lm.models.transformer import Encoder, SequenceClassifier, model_args
from lm.pipeline.evaluate import language_model_metrics, metric_directions
from lm.stages import STAGES, preflight
from lm.text.shards import TokenIndex, TokenShards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tokens"))


def copying_encoder(token_dir) -> Encoder:
    """An encoder that predicts, at every position, the token it is given there: its blocks add
    nothing (zero output projections), so each position's logits are its own embedding's similarity
    to every other."""
    torch.manual_seed(0)
    net = Encoder(
        model_args(
            ModelConfig(kind="encoder", preset="tiny", seq_len=32), TokenIndex.load(token_dir).vocab_size
        )
    )
    with torch.no_grad():
        for block in net.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return net.eval()


def test_an_encoder_is_scored_on_masked_tokens_it_cannot_see(token_dir, tmp_path):
    net = copying_encoder(token_dir)
    val = TokenShards(token_dir, "val")
    x = torch.from_numpy(val.window(0, 32)).unsqueeze(0)
    with torch.no_grad():
        seen = (net(x)[0].argmax(-1) == x).float().mean()
    assert seen > 0.9  # shown the answer, it gives it back
    save_model(net, tmp_path / "encoder")
    metrics = language_model_metrics(tmp_path / "encoder", token_dir, max_batches=4)
    # Scored where the token is hidden (80% [MASK], 10% another token, 10% kept): it can only be right
    # where the token was kept, about 10% of the time.
    assert metrics["eval/mlm_accuracy"] < 0.25, metrics
    assert {"eval/mlm_loss", "eval/baseline_mlm_loss"} <= set(metrics)
    assert not {"eval/loss", "eval/bpb"} & set(metrics)  # bits per byte describe a decoder's text, not this
    assert (
        language_model_metrics(tmp_path / "encoder", token_dir, max_batches=4) == metrics
    )  # a fixed masking


def test_metric_directions_follow_the_model_kind_and_the_method():
    assert metric_directions(load_config("tiny")) == {
        "eval/loss": "min",
        "eval/ppl": "min",
        "eval/bpb": "min",
        "eval/accuracy": "max",
        "eval/macro_f1": "max",
    }
    assert "eval/mlm_loss" in metric_directions(load_config("tiny", ["model.kind=encoder"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["deploy.promote_metric=eval/bpb"],
            "deploy.promote_mode='max', but eval/bpb is better when lower: set deploy.promote_mode=min",
        ),
        (["deploy.promote_metric=eval/accurracy"], "is not a metric the evaluate stage reports"),
        (
            ["model.kind=encoder", "deploy.promote_metric=eval/bpb", "deploy.promote_mode=min"],
            "choose one of eval/mlm_loss",
        ),
    ],
)
def test_a_promotion_metric_the_evaluation_cannot_give_stops_the_run_before_it_starts(
    overrides, message, tmp_path
):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        preflight(load_config("tiny", [f"workdir={tmp_path}", *overrides]), STAGES)


# An easy task with 8 labels: each label's texts draw their words from its own vocabulary. The
# classes are imbalanced (the majority baseline scores well above 1/8), and the last label never
# occurs in the test split.
TOPICS = {
    "fruit": "apple banana cherry grape lemon mango peach plum",
    "tools": "hammer wrench chisel pliers saw drill spanner file",
    "birds": "robin sparrow eagle heron finch owl swan crow",
    "weather": "rain snow fog hail wind storm frost drizzle",
    "music": "violin cello flute oboe drum harp piano horn",
    "space": "comet planet orbit nebula galaxy quasar moon star",
    "cloth": "silk wool linen cotton denim velvet satin tweed",
    "metal": "iron copper zinc tin nickel cobalt silver gold",
}


def topic_split(rng: random.Random, counts: list[int]) -> pd.DataFrame:
    rows = []
    for label, (topic, n) in enumerate(zip(TOPICS.values(), counts, strict=True)):
        words = topic.split()
        rows += [{"text": " ".join(rng.choices(words, k=6)), "label": label} for _ in range(n)]
    return pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def classified(token_dir, tmp_path_factory):
    """The classification method's evaluation of an untrained tiny classifier on the topic task:
    (metrics, test split, output folder)."""
    root = tmp_path_factory.mktemp("classify")
    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    test = topic_split(rng, [30, 20, 10, 10, 10, 10, 10, 0])
    splits = {"train": topic_split(rng, [60, 40, 20, 20, 20, 20, 20, 20]), "val": test, "test": test}
    for name, df in splits.items():
        df.to_parquet(data / SPLIT_FILES[name])
    (data / LABELS).write_text(json.dumps(list(TOPICS)))
    index = TokenIndex.load(token_dir)
    torch.manual_seed(0)
    net = SequenceClassifier(
        build_model(model_args(ModelConfig(preset="tiny", seq_len=32), index.vocab_size)), len(TOPICS)
    )
    save_model(net, root / "model", extra={"task": "classify", **index.special_ids(), "labels": list(TOPICS)})
    out = root / "evaluate"
    out.mkdir()
    metrics = classify.evaluate(root / "model", data, token_dir / "tokenizer.json", out_dir=out)
    return metrics, test, out


def test_a_classifier_is_scored_beside_the_majority_class_and_tfidf(classified, token_dir, tmp_path):
    metrics, test, out = classified
    for name in ("accuracy", "macro_f1"):
        for key in (f"eval/{name}", f"eval/baseline_{name}", f"eval/tfidf_{name}"):
            assert 0 <= metrics[key] <= 1, (key, metrics)
    assert metrics["eval/baseline_accuracy"] == 30 / 100  # "fruit", the train split's majority
    # Majority predictions: F1 2*30/(30+100) for "fruit", 0 for the six other labels of the test
    # split; "metal", in neither the test labels nor the predictions, does not count.
    assert metrics["eval/baseline_macro_f1"] == pytest.approx(60 / 130 / 7)
    # Each label has its own words: TF-IDF + logistic regression separates them.
    assert metrics["eval/tfidf_accuracy"] > 0.95 > metrics["eval/baseline_accuracy"], metrics
    assert metrics["eval/tfidf_macro_f1"] > metrics["eval/baseline_macro_f1"], metrics
    again = classify.evaluate(out.parent / "model", out.parent / "data", token_dir / "tokenizer.json", out_dir=tmp_path)
    assert again == metrics  # deterministic, baselines included


def test_a_classifier_evaluation_writes_per_class_scores_and_a_confusion_picture(classified):
    metrics, test, out = classified
    per_class = pd.read_csv(out / "per_class.csv", keep_default_na=False)
    assert per_class["label"].tolist() == list(TOPICS)
    assert {"precision", "recall", "f1", "support"} <= set(per_class.columns)
    assert per_class["support"].sum() == len(test) == metrics["eval/test_examples"]
    assert per_class["support"].tolist() == [30, 20, 10, 10, 10, 10, 10, 0]
    assert per_class[["precision", "recall", "f1"]].stack().between(0, 1).all()
    assert (out / "confusion.csv").is_file()
    png = (out / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    height, width, channels = matplotlib.image.imread(out / "confusion.png").shape
    assert height >= 600 and width >= 600 and channels in (3, 4)  # room for 8 labels a side
