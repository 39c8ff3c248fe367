"""Prefect task of the deploy stage: register the export, promote it if it beats the champion."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from lm.config import Config
from lm.registry import deploy as register_and_promote
from lm.stage import run_stage


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)  # only I/O against the registry is retried
def deploy(config: dict, out_dir: str, export_dir: str, evaluate_dir: str, run_id: str | None = None) -> str:
    cfg = Config.model_validate(config)
    metrics = json.loads((Path(evaluate_dir) / "metrics.json").read_text())
    run_stage(register_and_promote, Path(out_dir), cfg.tracking_uri(), run_id, Path(export_dir),
              Path(export_dir).name, metrics, cfg.deploy.model_name, cfg.deploy.alias, cfg.deploy.promote_metric)
    return out_dir
