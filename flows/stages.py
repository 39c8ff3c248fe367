"""One Prefect subflow per stage. Each can be triggered on its own (given its inputs' folders),
runs its task inside the stage's MLflow child run, and returns the stage's output folder."""

from __future__ import annotations

from prefect import flow

from lm.config import Config
from tasks import data, train
from tasks import deploy as deploy_tasks
from tasks import evaluate as eval_tasks
from tasks.common import run_stage_in_child_run


@flow(name="ingest")
def ingest_flow(config: dict, out_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(data.ingest, "ingest", Config.model_validate(config), parent_run_id, out_dir)


@flow(name="clean")
def clean_flow(config: dict, out_dir: str, ingest_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(data.clean, "clean", Config.model_validate(config), parent_run_id, out_dir,
                                  ingest_dir=ingest_dir)


@flow(name="tokenize")
def tokenize_flow(config: dict, out_dir: str, clean_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(data.tokenize, "tokenize", Config.model_validate(config), parent_run_id, out_dir,
                                  clean_dir=clean_dir)


@flow(name="finetune-data")
def finetune_data_flow(config: dict, out_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(data.finetune_data, "finetune_data", Config.model_validate(config),
                                  parent_run_id, out_dir)


@flow(name="pretrain")
def pretrain_flow(config: dict, out_dir: str, tokens_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(train.pretrain, "pretrain", Config.model_validate(config), parent_run_id, out_dir,
                                  pass_run_id=True, metrics_logged_live=True, tokens_dir=tokens_dir)


@flow(name="finetune")
def finetune_flow(config: dict, out_dir: str, ft_data_dir: str, tokens_dir: str, pretrain_dir: str,
                  parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(train.finetune, "finetune", Config.model_validate(config), parent_run_id, out_dir,
                                  pass_run_id=True, metrics_logged_live=True, ft_data_dir=ft_data_dir,
                                  tokens_dir=tokens_dir, pretrain_dir=pretrain_dir)


@flow(name="evaluate")
def evaluate_flow(config: dict, out_dir: str, pretrain_dir: str, finetune_dir: str, tokens_dir: str,
                  ft_data_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(eval_tasks.evaluate, "evaluate", Config.model_validate(config), parent_run_id,
                                  out_dir, pretrain_dir=pretrain_dir, finetune_dir=finetune_dir,
                                  tokens_dir=tokens_dir, ft_data_dir=ft_data_dir)


@flow(name="export")
def export_flow(config: dict, out_dir: str, finetune_dir: str, pretrain_dir: str, tokens_dir: str,
                ft_data_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(eval_tasks.export, "export", Config.model_validate(config), parent_run_id, out_dir,
                                  finetune_dir=finetune_dir, pretrain_dir=pretrain_dir, tokens_dir=tokens_dir,
                                  ft_data_dir=ft_data_dir)


@flow(name="deploy")
def deploy_flow(config: dict, out_dir: str, export_dir: str, evaluate_dir: str, parent_run_id: str | None = None) -> str:
    return run_stage_in_child_run(deploy_tasks.deploy, "deploy", Config.model_validate(config), parent_run_id, out_dir,
                                  pass_run_id=True, export_dir=export_dir, evaluate_dir=evaluate_dir)
