"""The clean stage on a real two-worker Dask cluster, through Prefect's DaskTaskRunner, gives the
same result as the local process pool."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from lm.config import CleanConfig, Config, DataConfig
from lm.data.clean import clean
from lm.data.ingest import Documents, ingest
from lm.pipeline.stage import StageContext, execute, stage_by_name
from lm.stages import STAGES


@pytest.mark.slow  # ~15 s: starts a scheduler and two worker processes
def test_two_worker_dask_cluster_matches_local(prefect_harness, tmp_path):
    from distributed import LocalCluster

    from tasks.cluster import dask_map

    docs_dir = tmp_path / "ingest"
    docs_dir.mkdir()
    ingest(DataConfig(sources=["stdlib"], max_docs=300, row_group_mb=0.25), out_dir=docs_dir)
    documents = docs_dir / "documents"
    assert Documents(documents).num_row_groups >= 4
    cfg = DataConfig(workers=2, val_fraction=0.1, clean=CleanConfig(preset="code"))
    local, remote = tmp_path / "local", tmp_path / "dask"
    local.mkdir()
    r_local = clean(cfg.model_copy(update={"workers": 1}), documents, out_dir=local)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        # The clean stage as the pipeline runs it, its map step given to the cluster.
        full = Config(data=cfg.model_copy(update={"dask_address": cluster.scheduler_address}))
        ctx = StageContext(full, {"ingest": docs_dir}, remote, cluster_map=dask_map(cluster.scheduler_address))
        r_dask = execute(stage_by_name(STAGES, "clean"), ctx)
        assert len(cluster.workers) == 2
        # Both workers took parts: the work really was spread over the cluster.
        with cluster.get_client() as client:
            done = client.run(lambda dask_worker: dask_worker.state.executed_count)
        assert all(n > 0 for n in done.values()), done
    for key in (
        "clean/docs_out",
        "clean/train_docs",
        "clean/val_docs",
        "dedup/exact_dups",
        "dedup/near_dups",
    ):
        assert r_local.metrics[key] == r_dask.metrics[key], key
    for name in ("train.parquet", "val.parquet"):
        pd.testing.assert_frame_equal(
            pq.read_table(local / name).to_pandas(), pq.read_table(remote / name).to_pandas()
        )
