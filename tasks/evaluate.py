"""Prefect tasks after training: evaluate, export, deploy."""

from __future__ import annotations

from pathlib import Path

from lm.config import Config
from lm.evaluate import evaluate as evaluate_models
from lm.export import export as export_model
from lm.stage import run_stage
from tasks.common import stage_task


@stage_task
def evaluate(config: dict, out_dir: str, pretrain_dir: str, finetune_dir: str, tokens_dir: str, ft_data_dir: str) -> str:
    cfg = Config.model_validate(config)
    run_stage(evaluate_models, Path(out_dir), Path(pretrain_dir), Path(finetune_dir), Path(tokens_dir),
              Path(ft_data_dir), cfg.model.seq_len, cfg.evaluate.max_batches)
    return out_dir


@stage_task
def export(config: dict, out_dir: str, finetune_dir: str, pretrain_dir: str, tokens_dir: str, ft_data_dir: str) -> str:
    run_stage(export_model, Path(out_dir), Path(finetune_dir), Path(pretrain_dir), Path(tokens_dir), Path(ft_data_dir))
    return out_dir
