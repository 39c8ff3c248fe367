"""Training on CPU: the entry point's outputs and metrics, MLM data, fine-tuning, divergence, checkpoint files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from train_fixtures import child_env, make_finetune_dir, make_token_dir, pretrain_args, tiny_config_yaml

from lm.config import PretrainConfig, load_config
from lm.errors import TrainingError
from lm.fileio import file_sha256
from lm.models.folder import load_model, save_model
from lm.models.transformer import Decoder, SequenceClassifier
from lm.pipeline.base_model import prepare_base
from lm.training.checkpoint import (
    StepCheckpoint,
    atomic_torch_save,
    is_valid,
    latest_valid_checkpoint,
    list_checkpoints,
    prune_checkpoints,
)
from lm.training.child import run_finetune, run_pretrain
from lm.training.modules import LanguageModelModule, warmup_cosine
from lm.training.pretrain_data import EpochSampler, TokenDataModule, WindowSampler, mask_tokens

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory) -> Path:
    return make_token_dir(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, token_dir) -> tuple[Path, dict]:
    """One tiny decoder pretraining run (~4 s), shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(tiny_config_yaml(tmp / "cfg.yaml", pretrain={"max_steps": 30, "val_every": 10}))
    metrics = run_pretrain(cfg, token_dir, tmp / "out")
    return tmp / "out", metrics


def test_pretrain_writes_the_contract_outputs_and_learns(pretrained):
    out, metrics = pretrained
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "model.json",
        "result.json",
        "samples.txt",
        "config.yaml",
        "checkpoints",
    } <= names
    result = json.loads((out / "result.json").read_text())
    saved = result["metrics"]
    assert saved == pytest.approx(metrics, nan_ok=True)
    assert saved["steps"] == 30 and saved["params"] > 0 and saved["tokens_per_s"] > 0
    # The digest the pipeline records is that of the weights file the stage publishes.
    assert result["weights_sha256"] == file_sha256(out / "model.safetensors")
    # ln(384) = 5.95 is a uniform guess; 30 tiny steps get well below it.
    assert saved["val/loss"] < 5.6 and saved["train/loss"] < 5.6
    assert saved["val/ppl"] == pytest.approx(np.exp(saved["val/loss"]), rel=1e-6)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [28, 30]  # every 4 + the end, keep 2
    assert all(is_valid(p) for _, p in list_checkpoints(out / "checkpoints"))
    assert "=== step 30 ===" in (out / "samples.txt").read_text()
    model = load_model(out)
    assert isinstance(model, Decoder) and model.meta["eot_id"] == 0 and model.meta["pad_id"] == 1
    assert load_config(out / "config.yaml").pretrain.max_steps == 30


@pytest.mark.slow  # ~8 s: two pretraining runs plus MLflow's first use of a sqlite store
def test_metrics_reach_the_given_mlflow_run_and_init_from_continues(
    tmp_path, token_dir, pretrained, tracking_uri
):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.create_experiment("t")
    run_id = client.create_run(exp).info.run_id
    cfg = load_config(
        tiny_config_yaml(
            tmp_path / "cfg.yaml",
            model={"preset": "tiny", "init_from": str(pretrained[0])},
            pretrain={"enabled": True, "max_steps": 6, "val_every": 3, "warmup_steps": 0, "lr": 1e-4},
        )
    )
    prepare_base(cfg, out_dir=(tmp_path / "base"))
    metrics = run_pretrain(
        cfg, token_dir, tmp_path / "out", init=tmp_path / "base", run_id=run_id, tracking_uri=tracking_uri
    )
    run = client.get_run(run_id)
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/ppl",
        "throughput/tokens_per_s",
    ):
        assert key in run.data.metrics, key
    assert "throughput/mfu" not in run.data.metrics  # CPU: no known peak
    assert len(client.get_metric_history(run_id, "val/loss")) == 2
    assert any(a.path == "samples" for a in client.list_artifacts(run_id))
    assert len(client.search_runs([exp])) == 1
    # Started from the pretrained weights at a small LR: close to where that run ended, far below uniform.
    assert metrics["val/loss"] < pretrained[1]["val/loss"] + 0.05


def test_encoder_pretrains_with_masked_language_modelling(tmp_path, token_dir):
    cfg = load_config(
        tiny_config_yaml(
            tmp_path / "cfg.yaml",
            model={"kind": "encoder", "preset": "tiny", "seq_len": 32},
            pretrain={"max_steps": 8, "val_every": 4},
        )
    )
    metrics = run_pretrain(cfg, token_dir, tmp_path / "out")
    assert np.isfinite(metrics["val/loss"]) and metrics["val/loss"] < 6.0
    assert load_model(tmp_path / "out").meta["kind"] == "encoder"
    assert not (tmp_path / "out" / "samples.txt").exists()


def test_mask_tokens_follows_bert_proportions():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 1000, size=200_000)
    inputs, targets = mask_tokens(tokens, rng, 0.15, mask_id=3, vocab_size=1000)
    chosen = targets != -100
    assert chosen.mean() == pytest.approx(0.15, abs=0.005)
    assert np.array_equal(targets[chosen], tokens[chosen])
    assert np.array_equal(inputs[~chosen], tokens[~chosen])
    as_mask = (inputs[chosen] == 3).mean()
    unchanged = (inputs[chosen] == tokens[chosen]).mean()
    assert as_mask == pytest.approx(0.8, abs=0.01) and unchanged == pytest.approx(0.1, abs=0.01)


def test_window_sampler_splits_ranks_and_resumes():
    ranks = [list(WindowSampler(10, r, 2)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == 10
    s = WindowSampler(10, 1, 2)
    s.consumed = 4
    again = WindowSampler(10, 1, 2)
    again.load_state_dict(s.state_dict())
    assert list(again) == ranks[1][4:]


def test_epoch_sampler_orders_each_epoch_anew_splits_ranks_and_resumes():
    ranks = [EpochSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    first = [list(s) for s in ranks]
    assert sorted(first[0] + first[1]) == list(range(10)) and len(first[0]) == len(ranks[0]) == 5
    ranks[0].consumed = 5  # one epoch done: the next has another order
    second = list(ranks[0])
    assert second != first[0] and len(second) == 5
    again = EpochSampler(10, seed=3, rank=0, world_size=2)
    again.load_state_dict({"consumed": 7})  # mid-way through the second epoch
    assert list(again) == second[2:]


def test_token_datamodule_gives_shifted_windows(token_dir):
    dm = TokenDataModule(token_dir, seq_len=16, batch_size=3, seed=1, val_batches=2)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    vx, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(vx, next(iter(dm.val_dataloader()))[0])  # fixed validation windows


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, 10, 110, 0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_finetune_classifier_on_the_pretrained_backbone(tmp_path, token_dir, pretrained):
    ft = make_finetune_dir(tmp_path / "ft")
    cfg = load_config(tiny_config_yaml(tmp_path / "cfg.yaml", finetune={"max_steps": 60, "val_every": 20, "lr": 3e-3}))
    metrics = run_finetune(cfg, ft, token_dir, pretrained[0], tmp_path / "out")
    # Three balanced classes: a guess scores ln 3 = 1.10 and 1/3; 60 steps learn well past both.
    assert metrics["val/loss"] < 0.95 and metrics["val/accuracy"] > 0.5, metrics
    clf = load_model(tmp_path / "out")
    assert isinstance(clf, SequenceClassifier) and clf.meta["labels"] == ["glob", "shlex", "textwrap"]
    assert clf.meta["task"] == "classify" and clf.meta["pad_id"] == 1
    saved = json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]
    assert {"train/loss", "val/loss", "val/accuracy", "steps", "params", "tokens_per_s"} <= set(saved)
    # The backbone started from the pretrained weights: with it frozen, it ends exactly as pretrained
    # (a fresh initialisation would not); unfrozen, it moved from them, less than a fresh one lies apart.
    pre = load_model(pretrained[0]).state_dict()
    head_only = cfg.finetune.classify.model_copy(update={"freeze_backbone": True})
    frozen_cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"classify": head_only})})
    run_finetune(frozen_cfg, ft, token_dir, pretrained[0], tmp_path / "frozen")
    frozen = load_model(tmp_path / "frozen").backbone.state_dict()
    assert all(torch.equal(frozen[k], pre[k]) for k in pre)
    tuned, fresh = clf.backbone.state_dict(), Decoder(clf.backbone.args).state_dict()
    moved = sum(float((tuned[k] - pre[k]).norm()) for k in pre)
    apart = sum(float((fresh[k] - pre[k]).norm()) for k in pre)
    assert 0 < moved < apart, (moved, apart)


@pytest.mark.slow  # ~6 s: a fresh `python -m lm.training.child` process
def test_nan_loss_stops_the_entry_point_with_one_clear_line(tmp_path, token_dir):
    poisoned = Decoder(load_model_args(token_dir))
    with torch.no_grad():
        poisoned.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    save_model(poisoned, tmp_path / "nan-model")
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml", model={"init_from": str(tmp_path / "nan-model")}, pretrain={"enabled": True}
    )
    prepare_base(load_config(cfg), out_dir=tmp_path / "base")
    proc = subprocess.run(
        [sys.executable, *pretrain_args(cfg, token_dir, tmp_path / "out", "--init", str(tmp_path / "base"))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=child_env(),
    )
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmforge: error:")]
    assert len(errors) == 1 and "NaN or infinite" in errors[0] and "Traceback" not in proc.stderr
    assert not list_checkpoints(tmp_path / "out" / "checkpoints")


def load_model_args(token_dir: Path):
    from lm.config import ModelConfig
    from lm.models.transformer import model_args
    from lm.text.shards import TokenIndex

    return model_args(ModelConfig(preset="tiny", seq_len=32), TokenIndex.load(token_dir).vocab_size)


class _PoisonAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.norm.weight.fill_(float("nan"))


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, token_dir):
    """Weights turn NaN after step 5: the step-4 checkpoint stays, none is written after it."""
    net = Decoder(load_model_args(token_dir))
    module = LanguageModelModule(net, PretrainConfig(lr=1e-3, warmup_steps=1, max_steps=12), check_every=2)
    ckpt = StepCheckpoint(tmp_path / "ckpt", every=4, keep_last=3, before_save=module.raise_if_diverged)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        callbacks=[ckpt, _PoisonAt(5)],
        enable_progress_bar=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    dm = TokenDataModule(token_dir, 32, 2, seed=0, train_samples=24)
    with pytest.raises(TrainingError, match="step 6"):
        trainer.fit(module, datamodule=dm)
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt")] == [4]
    state = torch.load(tmp_path / "ckpt" / "step-00000004.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_truncated_checkpoint_is_skipped_and_old_ones_pruned(tmp_path):
    for step in (10, 20, 30):
        atomic_torch_save(
            {"state_dict": {"w": torch.full((1000,), float(step))}}, tmp_path / f"step-{step:08d}.ckpt"
        )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind
    newest = tmp_path / "step-00000030.ckpt"
    newest.write_bytes(newest.read_bytes()[:-200])  # a torn write
    messages = []
    assert latest_valid_checkpoint(tmp_path, log=messages.append) == tmp_path / "step-00000020.ckpt"
    assert "truncated or corrupt" in messages[0]
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]


def test_bad_trainer_settings_are_config_errors(tmp_path, token_dir):
    from lm.errors import ConfigError

    with pytest.raises(ConfigError, match="fsdp needs GPUs"):
        load_config(tiny_config_yaml(tmp_path / "cfg.yaml", trainer={"accelerator": "cpu", "strategy": "fsdp"}))
    cfg = load_config(
        tiny_config_yaml(tmp_path / "cfg.yaml", trainer={"accelerator": "cpu", "precision": "17-mixed"})
    )
    with pytest.raises(ConfigError, match="precision=17-mixed"):
        run_pretrain(cfg, token_dir, tmp_path / "out")


@pytest.mark.gpu
def test_fsdp_bf16_on_gpu_exports_full_weights(tmp_path, token_dir):
    n = min(2, torch.cuda.device_count())
    cfg = load_config(
        tiny_config_yaml(
            tmp_path / "cfg.yaml",
            trainer={"accelerator": "cuda", "strategy": "fsdp", "devices": n, "precision": "bf16-mixed"},
        )
    )
    if n > 1:  # more than one rank: through the entry point, as the pipeline launches it
        proc = subprocess.run(
            [sys.executable, *pretrain_args(tmp_path / "cfg.yaml", token_dir, tmp_path / "out")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        run_pretrain(cfg, token_dir, tmp_path / "out")
    model = load_model(tmp_path / "out")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]["val/loss"] < 6.0
