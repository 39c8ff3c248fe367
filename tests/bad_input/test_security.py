"""Nothing not written by lmforge is unpickled; no secret reaches MLflow or Prefect's records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lm.config import load_config
from lm.errors import ConfigError


class _RunsCode:
    """A pickle that runs a command when loaded (CVE-2024-37052 is this, in an MLflow model)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    from lm.model import build_model, model_args
    from lm.train import load_weights_into

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, tmp_path / "model.ckpt")
    net = build_model(model_args(load_config("tiny").model, 512))
    with pytest.raises(ConfigError, match="refused: the file holds Python objects beyond tensors"):
        load_weights_into(net, tmp_path / "model.ckpt")
    assert not marker.exists()


@pytest.mark.slow  # the data stages through the session's Prefect server
def test_secrets_in_the_environment_are_not_recorded(prefect_harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline import pipeline

    secret = "p4ssw0rd-7d1e0c"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    monkeypatch.setenv("LMFORGE_TEST_API_KEY", secret)
    db = tmp_path / "mlflow.db"
    cfg = load_config("tiny", [f"workdir={tmp_path / 'w'}", f"tracking.uri=sqlite:///{db}"])
    state = pipeline(config=cfg, targets=["tokenize"], return_state=True)
    assert state.is_completed()
    recorded = [db, *(p for p in tmp_path.rglob("*") if p.is_file() and p != db)]
    for path in recorded:
        assert secret.encode() not in path.read_bytes(), path
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()  # the pipeline's and its stages' subflows (and earlier tests')
        logs = []
        for run in runs:
            logs += client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert len(logs) > 10 and not [log for log in logs if secret in log.message]
    assert not [r for r in runs if secret in str(r.parameters)]
