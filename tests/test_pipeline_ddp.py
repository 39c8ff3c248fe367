"""Issue 4 (a): two-process DDP started by the Prefect pipeline's pretrain task, on CPU (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lm.tracking import run_tree


@pytest.mark.slow  # ~60 s: data stages, then two training processes started by Lightning's launcher
def test_pipeline_pretrains_with_two_ddp_ranks(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = pipeline(config_file="tiny", until="pretrain", overrides=[
        f"workdir={tmp_path / 'runs'}", f"tracking.uri={uri}",
        "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "pretrain.max_steps=10",
    ])
    manifest = json.loads((Path(out["pretrain"]) / "manifest.json").read_text())
    digests = {k: v for k, v in manifest["params"].items() if k.startswith("weights_sha256/")}
    assert set(digests) == {"weights_sha256/rank0", "weights_sha256/rank1"}
    assert len(set(digests.values())) == 1, "the two ranks ended with different weights"

    tree = run_tree(uri, out["mlflow_run_id"])
    client = MlflowClient(uri)
    every_run = client.search_runs([tree["parent"].info.experiment_id])
    with_loss = [r for r in every_run if "train/loss" in r.data.metrics]
    assert [r.info.run_id for r in with_loss] == [tree["children"]["pretrain"].info.run_id]
    # Parent + one child per stage up to pretrain; no stray run opened by rank 1.
    assert len(every_run) == 1 + len(tree["children"])
