"""Scheduled retraining: the pipeline as a Prefect deployment, registered on a real Prefect server."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # a few seconds, plus the session's Prefect test server
def test_retrain_deployment_carries_schedule_parameters_and_one_run_at_a_time(prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.schedule import retrain_deployment
    from lm.config import Config, load_config

    cfg = load_config("tiny", ["pretrain.max_steps=5"])
    deployment = retrain_deployment("nightly-test", "0 3 * * *", cfg)
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        schedules = client.read_deployment_schedules(deployment_id)
    assert stored.name == "nightly-test"
    # The resolved config is the deployment's parameter, and loads back to the same config.
    assert Config.model_validate(stored.parameters["config"]) == cfg
    assert stored.parameters["targets"] is None
    # Its schema is the config's: the Prefect UI renders it as a form, section by section.
    schema = stored.parameter_openapi_schema
    assert "config" in schema["properties"] and "pretrain" in str(schema)
    assert [s.schedule.cron for s in schedules] == ["0 3 * * *"]
    assert stored.global_concurrency_limit is not None and stored.global_concurrency_limit.limit == 1
