"""Prefect tasks of the data stages: each wraps one lm/ function, cached by its output folder."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import unmapped

from lm.config import Config, DataConfig
from lm.data.clean import PartResult, PartTask, clean_part
from lm.data.clean import clean as clean_documents
from lm.data.ingest import ingest as ingest_documents
from lm.data.labelled import build_finetune_data
from lm.stage import StageResult, run_stage
from lm.tokenizer import tokenize as tokenize_corpus
from tasks.common import stage_task


@stage_task
def ingest(config: dict, out_dir: str) -> str:
    cfg = Config.model_validate(config)
    run_stage(ingest_documents, Path(out_dir), cfg.data)
    return out_dir


@task(name="clean-part", cache_policy=NO_CACHE, persist_result=False, retries=1)
def clean_part_task(part: PartTask, data: dict) -> PartResult:
    """One row group through the filters and MinHash, on whichever Dask worker takes it."""
    return clean_part(part, DataConfig.model_validate(data))


@flow(name="clean-parts")
def clean_parts_flow(parts: list[PartTask], data: dict) -> list[PartResult]:
    futures = clean_part_task.map(parts, unmapped(data))
    return [f.result() for f in futures]  # in part order: the reduce step relies on it


def clean_on_dask(cfg: DataConfig, documents: Path, *, out_dir: Path) -> StageResult:
    """The clean stage with its map step as Prefect tasks on the Dask cluster at data.dask_address.
    Workers need lmforge installed and the work directory on a filesystem they share."""
    from prefect_dask import DaskTaskRunner

    on_cluster = clean_parts_flow.with_options(task_runner=DaskTaskRunner(address=cfg.dask_address))
    return clean_documents(
        cfg,
        documents,
        out_dir=out_dir,
        map_parts=lambda parts, c: on_cluster(parts, c.model_dump(mode="json")),
    )


@stage_task
def clean(config: dict, out_dir: str, ingest_dir: str) -> str:
    cfg = Config.model_validate(config)
    fn = clean_on_dask if cfg.data.dask_address else clean_documents
    run_stage(fn, Path(out_dir), cfg.data, Path(ingest_dir) / "documents.parquet")
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
