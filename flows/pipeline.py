"""The lmforge pipeline: ingest -> clean -> tokenize -> pretrain -> finetune -> evaluate -> export -> deploy."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.stages import (
    clean_flow,
    deploy_flow,
    evaluate_flow,
    export_flow,
    finetune_data_flow,
    finetune_flow,
    ingest_flow,
    pretrain_flow,
    tokenize_flow,
)
from lm import tracking
from lm.config import load_config
from lm.workspace import stage_dirs

STAGE_ORDER = ("data", "pretrain", "finetune", "evaluate", "export", "deploy")


@flow(name="lmforge-pipeline")
def pipeline(config_file: str | None = None, overrides: list[str] | None = None, until: str = "deploy") -> dict:
    """Run the pipeline up to and including stage ``until``; finished, unchanged stages are reused."""
    cfg = load_config(config_file, overrides or [])
    dirs = stage_dirs(cfg)
    c = cfg.model_dump(mode="json")
    uri = cfg.tracking_uri()
    logger = get_run_logger()
    parent = tracking.start_pipeline_run(cfg, {"lmforge.prefect_flow_run_id": str(flow_run.id),
                                              "lmforge.until": until})
    logger.info("MLflow parent run %s (tracking %s)", parent, uri)
    last = STAGE_ORDER.index(until)
    out: dict[str, str] = {"mlflow_run_id": parent, "tracking_uri": uri}
    ok = False
    try:
        out["ingest"] = ingest_flow(c, str(dirs.ingest), parent)
        out["clean"] = clean_flow(c, str(dirs.clean), out["ingest"], parent)
        out["tokenize"] = tokenize_flow(c, str(dirs.tokenize), out["clean"], parent)
        out["finetune_data"] = finetune_data_flow(c, str(dirs.finetune_data), parent)
        if last >= STAGE_ORDER.index("pretrain"):
            out["pretrain"] = pretrain_flow(c, str(dirs.pretrain), out["tokenize"], parent)
        if last >= STAGE_ORDER.index("finetune"):
            out["finetune"] = finetune_flow(c, str(dirs.finetune), out["finetune_data"], out["tokenize"],
                                            out["pretrain"], parent)
        if last >= STAGE_ORDER.index("evaluate"):
            out["evaluate"] = evaluate_flow(c, str(dirs.evaluate), out["pretrain"], out["finetune"],
                                            out["tokenize"], out["finetune_data"], parent)
        if last >= STAGE_ORDER.index("export"):
            out["export"] = export_flow(c, str(dirs.export), out["finetune"], out["pretrain"], out["tokenize"],
                                        out["finetune_data"], parent)
        if last >= STAGE_ORDER.index("deploy"):
            deploy_dir = Path(cfg.workdir).expanduser().resolve() / "deploy" / dirs.export.name
            out["deploy"] = deploy_flow(c, str(deploy_dir), out["export"], out["evaluate"], parent)
        ok = True
        return out
    finally:
        tracking.end_run(uri, parent, ok)
