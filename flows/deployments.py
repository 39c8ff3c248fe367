"""Scheduled retraining through Prefect deployments.

``lmforge schedule --cron "0 3 * * 1"`` serves the pipeline as a deployment that Prefect runs on
that schedule (and that anyone can trigger from the Prefect UI, where the config is a form). The
deployment holds the resolved config as its parameter: what runs is what was scheduled, until the
deployment is served again with another config. At most one pipeline run at a time: a runner
started after downtime would otherwise launch the whole backlog of missed runs at once. For a
team, point PREFECT_API_URL at a Prefect server and use a work pool instead of this long-running
process: the deployment is the same.
"""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import pipeline
from lm.config import Config


def retrain_deployment(name: str, cron: str, config: Config):
    """The whole pipeline as a Prefect deployment on a cron schedule, one run at a time."""
    return pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters={"config": config.model_dump(mode="json"), "targets": None},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        description="lmforge retraining: the whole pipeline; unchanged stages are reused from cache, "
        "and the registry alias moves only if the new model is better.",
        tags=["lmforge"],
    )


def serve_retraining(name: str, cron: str, config: Config) -> None:
    from prefect import serve

    serve(retrain_deployment(name, cron, config))
