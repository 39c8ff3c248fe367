"""Shared fixtures: the real Prefect engine (one test harness per session), real MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Keep test processes small and polite on a 2-core machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A real, temporary Prefect server and database for the whole session (started once: ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh MLflow sqlite store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core CI box makes 2 threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(prefect_harness, tmp_path_factory):
    """Run the whole tiny pipeline twice with nothing changed; yield both results and timings.
    Once per session: tests/test_pipeline.py and tests/test_report.py read the same runs."""
    import time

    from flows.pipeline import pipeline
    from lm.config import load_config

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config("tiny", [f"workdir={tmp / 'runs'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"])
    t0 = time.monotonic()
    first = pipeline(config=cfg)
    t1 = time.monotonic()
    second = pipeline(config=cfg)
    t2 = time.monotonic()
    return {"first": first, "second": second, "t_first": t1 - t0, "t_second": t2 - t1, "tmp": tmp, "cfg": cfg}
