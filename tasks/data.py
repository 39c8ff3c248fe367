"""Prefect tasks of the data stages: each wraps one lm/ function, cached by its output folder."""

from __future__ import annotations

from pathlib import Path

from lm.config import Config
from lm.data.clean import clean as clean_documents
from lm.data.ingest import ingest as ingest_documents
from lm.data.labelled import build_finetune_data
from lm.stage import run_stage
from lm.tokenizer import tokenize as tokenize_corpus
from tasks.common import stage_task


@stage_task
def ingest(config: dict, out_dir: str) -> str:
    cfg = Config.model_validate(config)
    run_stage(ingest_documents, Path(out_dir), cfg.data)
    return out_dir


@stage_task
def clean(config: dict, out_dir: str, ingest_dir: str) -> str:
    cfg = Config.model_validate(config)
    run_stage(clean_documents, Path(out_dir), cfg.data, Path(ingest_dir) / "documents.parquet")
    return out_dir


@stage_task
def tokenize(config: dict, out_dir: str, clean_dir: str) -> str:
    cfg = Config.model_validate(config)
    run_stage(tokenize_corpus, Path(out_dir), cfg, Path(clean_dir))
    return out_dir


@stage_task
def finetune_data(config: dict, out_dir: str) -> str:
    cfg = Config.model_validate(config)
    run_stage(build_finetune_data, Path(out_dir), cfg)
    return out_dir
