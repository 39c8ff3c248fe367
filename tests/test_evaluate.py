"""Evaluation by model kind, under eval/ names, and the promotion metric's direction checked early."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import make_token_dir

from lm.config import ModelConfig, load_config
from lm.errors import ConfigError
from lm.evaluate import language_model_metrics, metric_directions
from lm.model import Encoder, model_args, save_model
from lm.shards import TokenIndex, TokenShards
from lm.stages import STAGES, preflight

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
