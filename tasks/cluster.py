"""Work items of one stage mapped over a Dask cluster, as Prefect tasks (one per item, visible and
retried in the Prefect UI) through prefect-dask's DaskTaskRunner.

Workers need lmforge installed and the work directory on a filesystem they share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import unmapped


def dask_map(address: str) -> Callable[[Callable, list, Any], list]:
    """``map(fn, items, shared) -> [fn(item, shared) for item in items]``, run on the cluster at
    ``address``, results in item order."""
    from prefect_dask import DaskTaskRunner

    def map_on_cluster(fn: Callable, items: list, shared: Any) -> list:
        part = task(fn, name=fn.__name__, cache_policy=NO_CACHE, persist_result=False, retries=1)

        @flow(name=f"{fn.__name__.replace('_', '-')}-on-dask", task_runner=DaskTaskRunner(address=address))
        def on_cluster(items: list, shared: Any) -> list:
            return [f.result() for f in part.map(items, unmapped(shared))]

        return on_cluster(items, shared)

    return map_on_cluster
