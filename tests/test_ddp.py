"""Real distributed training on CPU (gloo): Lightning's ddp launcher, and two torchrun "nodes".

Both check what a user relies on: every rank ends with the same weights, and exactly one MLflow
run (the one created by the caller and passed by id) holds the metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import (
    child_env,
    finetune_args,
    free_port,
    make_finetune_dir,
    make_token_dir,
    pretrain_args,
    run_training,
    tiny_config_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
DIGEST = re.compile(r"lmforge: rank (\d+) weights sha256 ([0-9a-f]{64})")


def _mlflow_run(tracking_uri: str) -> tuple[object, str, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.create_experiment("ddp")
    return client, exp, client.create_run(exp).info.run_id


def _check(outputs: str, client, exp: str, run_id: str, out: Path) -> None:
    digests = dict(DIGEST.findall(outputs))
    assert set(digests) == {"0", "1"}, outputs[-3000:]
    assert digests["0"] == digests["1"]
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [run_id]  # no rank opened a run of its own
    metrics = client.get_run(run_id).data.metrics
    assert {"train/loss", "val/loss", "val/ppl", "train/grad_norm", "throughput/tokens_per_s"} <= set(metrics)
    # Rank 0 alone logs: one value per logged step, not two.
    steps = [m.step for m in client.get_metric_history(run_id, "val/loss")]
    assert steps == sorted(set(steps))
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["world_size"] == 2 and (out / "model.safetensors").is_file()


def _logged_pretrain_args(cfg: Path, tokens: Path, out: Path, run_id: str, uri: str) -> list[str]:
    """The entry point's arguments with an MLflow run to log into and every rank's weight digest."""
    return pretrain_args(cfg, tokens, out, "--run-id", run_id, "--tracking-uri", uri, "--print-weight-digest")


@pytest.mark.slow  # ~25 s: two gloo ranks started by Lightning's ddp launcher
def test_two_process_ddp_ranks_agree_and_one_run_holds_metrics(tmp_path, tracking_uri):
    tokens = make_token_dir(tmp_path / "tokens")
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml", trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "log_every": 2}
    )
    client, exp, run_id = _mlflow_run(tracking_uri)
    proc = subprocess.run(
        [
            sys.executable,
            *_logged_pretrain_args(cfg, tokens, tmp_path / "out", run_id, tracking_uri),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(proc.stdout + proc.stderr, client, exp, run_id, tmp_path / "out")
    assert "world 2" in proc.stdout


@pytest.mark.slow  # ~25 s: two torchrun launches rendezvous on 127.0.0.1 as two nodes
def test_two_node_torchrun_ranks_agree_and_one_run_holds_metrics(tmp_path, tracking_uri):
    tokens = make_token_dir(tmp_path / "tokens")
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        trainer={"accelerator": "cpu", "devices": 1, "num_nodes": 2, "strategy": "ddp", "log_every": 2},
    )
    client, exp, run_id = _mlflow_run(tracking_uri)
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            *_logged_pretrain_args(cfg, tokens, tmp_path / "out", run_id, tracking_uri),
        ]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=child_env()
            )
        )
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outputs.append(out)
        assert p.returncode == 0, out[-3000:]
    _check("\n".join(outputs), client, exp, run_id, tmp_path / "out")
    assert "world 2" in outputs[0]


@pytest.mark.slow  # ~25 s: a short pretraining, then two gloo ranks fine-tuning
def test_two_process_ddp_finetuning_splits_the_examples_and_ranks_agree(tmp_path, tracking_uri):
    import pandas as pd

    from lm.finetune.classify import Predictor

    tokens = make_token_dir(tmp_path / "tokens")
    ft = make_finetune_dir(tmp_path / "ft")
    run_training(
        pretrain_args(
            tiny_config_yaml(tmp_path / "one.yaml", pretrain={"max_steps": 4}), tokens, tmp_path / "pre"
        )
    )
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
        finetune={"max_steps": 12, "val_every": 6},
    )
    client, exp, run_id = _mlflow_run(tracking_uri)
    logged = ("--run-id", run_id, "--tracking-uri", tracking_uri, "--print-weight-digest")
    proc = run_training(finetune_args(cfg, ft, tokens, tmp_path / "pre", tmp_path / "out", *logged))
    digests = dict(DIGEST.findall(proc.stdout + proc.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    result = json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]
    assert result["world_size"] == 2
    # The two ranks validated every example of the val split once between them: their accuracy is
    # that of the saved weights on the whole split, computed here in one process.
    val = pd.read_parquet(ft / "val.parquet")
    predicted = (
        Predictor(tmp_path / "out", tokens / "tokenizer.json").probabilities(val["text"].tolist()).argmax(-1)
    )
    assert result["val/accuracy"] == pytest.approx(float((predicted == val["label"].to_numpy()).mean()))
    assert [r.info.run_id for r in client.search_runs([exp])] == [run_id]
    assert "val/accuracy" in client.get_run(run_id).data.metrics


@pytest.mark.slow  # ~30 s: two gloo ranks fine-tuning a Gemma 2 (sliding windows, soft-capping, sandwich norms)
def test_two_process_ddp_finetunes_an_imported_family_and_ranks_agree(tmp_path, tracking_uri):
    """A family's switches change nothing for the strategies: an imported Gemma 2 tunes under DDP, both
    ranks end with the same weights, and what is saved is still a Gemma 2."""
    import shutil

    import torch
    import transformers

    from lm.models.folder import load_model
    from lm.models.hf import import_hf
    from lm.text.shards import TokenIndex

    tokens = make_token_dir(tmp_path / "tokens")
    ft = make_finetune_dir(tmp_path / "ft")
    config = transformers.Gemma2Config(
        vocab_size=TokenIndex.load(tokens).vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    shutil.copy(tokens / "tokenizer.json", tmp_path / "gemma2" / "tokenizer.json")
    import_hf(tmp_path / "gemma2", tmp_path / "pre", max_seq_len=32)
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
        finetune={"max_steps": 8, "val_every": 4},
    )
    client, exp, run_id = _mlflow_run(tracking_uri)
    logged = ("--run-id", run_id, "--tracking-uri", tracking_uri, "--print-weight-digest")
    proc = run_training(finetune_args(cfg, ft, tokens, tmp_path / "pre", tmp_path / "out", *logged))
    digests = dict(DIGEST.findall(proc.stdout + proc.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]["world_size"] == 2
    tuned = load_model(tmp_path / "out").backbone
    assert tuned.args.family == "gemma2" and tuned.args.attn_softcap == 50.0 and tuned.args.sliding_window == 8
