"""Issue 4 (a): two-process DDP started by the Prefect pipeline's pretrain task, on CPU (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lm.config import load_config
from lm.fileio import file_sha256
from lm.tracking.runs import run_tree


@pytest.mark.slow  # ~60 s: data stages, then two training processes started by Lightning's launcher
def test_pipeline_pretrains_with_two_ddp_ranks(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", [
        f"workdir={tmp_path / 'runs'}", f"tracking.uri={uri}",
        "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "pretrain.max_steps=10",
    ])
    out = pipeline(config=cfg, targets=["pretrain"])
    manifest = json.loads((Path(out["pretrain"]) / "manifest.json").read_text())
    # Trained by two ranks (that they agree is checked in test_ddp.py); the published weights' digest
    # is what the stage records.
    assert manifest["metrics"]["pretrain/world_size"] == 2
    assert manifest["params"]["weights_sha256"] == file_sha256(Path(out["pretrain"]) / "model.safetensors")

    tree = run_tree(uri, out["mlflow_run_id"])
    client = MlflowClient(uri)
    every_run = client.search_runs([tree["parent"].info.experiment_id])
    with_loss = [r for r in every_run if "train/loss" in r.data.metrics]
    assert [r.info.run_id for r in with_loss] == [tree["children"]["pretrain"].info.run_id]
    # Parent + one child per stage up to pretrain; no stray run opened by rank 1.
    assert len(every_run) == 1 + len(tree["children"])
