"""Finding pipeline runs again in a real MLflow sqlite store: the one search that ``lmforge report``
(the newest runs), the new-data check (the whole-pipeline runs of a config) and ``lmforge trigger``
(the run a Prefect flow run made) all use, with each one's filter."""

from __future__ import annotations

import time

import pytest

from lm.config import load_config
from lm.tracking.runs import end_run, pipeline_runs, stage_output, start_pipeline_run, start_stage_run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four pipeline runs, oldest first: tiny (all stages, finished, made by flow run flow-1, with a
    stage run carrying that flow run id too), other (another config), tiny (two stages only), tiny
    (all stages, failed)."""
    tmp = tmp_path_factory.mktemp("pipeline-runs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"

    def started(name: str, targets: str, flow_run: str, ok: bool) -> str:
        cfg = load_config("tiny", [f"name={name}", f"workdir={tmp / 'runs'}", f"tracking.uri={uri}"])
        run_id = start_pipeline_run(cfg, {"lmforge.targets": targets, "lmforge.prefect_flow_run_id": flow_run})
        stage = start_stage_run(uri, run_id, "ingest", {})
        end_run(uri, stage, True)
        end_run(uri, run_id, ok)
        time.sleep(0.01)  # distinct start times: the search orders by them
        return run_id

    runs = [started("tiny", "all", "flow-1", True), started("other", "all", "flow-2", True),
            started("tiny", "ingest,clean", "flow-3", True), started("tiny", "all", "flow-4", False)]
    return uri, runs


def _ids(found: list[dict]) -> list[str]:
    return [r["run_id"] for r in found]


def test_the_newest_pipeline_runs_come_first_without_their_stage_runs(store):
    uri, (first, other, partial, failed) = store
    everything = pipeline_runs(uri, "lmforge", 20)
    assert _ids(everything) == [failed, partial, other, first]
    assert _ids(pipeline_runs(uri, "lmforge", 2)) == [failed, partial]
    newest = everything[0]
    assert newest["status"] == "FAILED" and everything[-1]["status"] == "FINISHED"
    assert newest["name"].startswith("tiny-") and newest["end"] >= newest["start"] > 0
    assert newest["tags"]["lmforge.config"] == "tiny" and newest["experiment_id"]


def test_whole_pipeline_runs_of_one_config(store):
    """What the new-data check reads: the last finished run and every run started since."""
    uri, (first, _, _, failed) = store
    found = pipeline_runs(uri, "lmforge", 50, config="tiny", targets="all")
    assert _ids(found) == [failed, first]
    assert [r["status"] for r in found] == ["FAILED", "FINISHED"]
    assert pipeline_runs(uri, "lmforge", 50, config="nobody", targets="all") == []


def test_the_pipeline_run_of_a_flow_run_is_its_parent_not_its_stage(store):
    uri, (first, other, _, _) = store
    assert _ids(pipeline_runs(uri, "lmforge", 1, flow_run_id="flow-1")) == [first]
    assert _ids(pipeline_runs(uri, "lmforge", 1, flow_run_id="flow-2")) == [other]
    assert pipeline_runs(uri, "lmforge", 1, flow_run_id="flow-9") == []


def test_a_stage_output_is_read_from_its_child_run(store):
    from mlflow.tracking import MlflowClient

    uri, (first, *_) = store
    [run] = pipeline_runs(uri, "lmforge", 1, flow_run_id="flow-1")
    assert stage_output(uri, run, "ingest") is None  # the stage logged no output
    [ingest] = MlflowClient(uri).search_runs([run["experiment_id"]], f"tags.mlflow.parentRunId = '{first}'")
    MlflowClient(uri).set_tag(ingest.info.run_id, "lmforge.output", "/runs/ingest/abc")
    assert str(stage_output(uri, run, "ingest")) == "/runs/ingest/abc"
    assert stage_output(uri, run, "clean") is None


def test_no_store_or_no_experiment_finds_nothing_and_creates_nothing(store, tmp_path):
    uri, _ = store
    assert pipeline_runs(uri, "no-such-experiment", 5) == []
    missing = tmp_path / "none.db"
    assert pipeline_runs(f"sqlite:///{missing}", "lmforge", 5, config="tiny", targets="all") == []
    assert not missing.exists()


def test_the_new_data_check_compares_with_the_last_finished_whole_run_of_its_config(tmp_path):
    """The check's side of the search: runs of some stages only, or of another config, are not
    what new data is counted against; a failed run since on the same data starts nothing."""
    from mlflow.tracking import MlflowClient

    from flows.watch import should_retrain
    from lm.data.ingest import PROVENANCE
    from lm.pipeline.retrain import data_digest, source_digests

    corpus, runs_dir, ingested = tmp_path / "corpus", tmp_path / "runs", tmp_path / "ingest"
    for folder in (corpus, runs_dir, ingested):
        folder.mkdir()
    (corpus / "a.txt").write_text("alpha " * 100)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.sources=[{corpus}]", f"workdir={runs_dir}", f"tracking.uri={uri}"]
    cfg = load_config("tiny", overrides)
    start, why = should_retrain(cfg)
    assert not start and "no finished pipeline run of config 'tiny'" in why

    def run(cfg, targets: str, ok: bool, output: str | None = None) -> str:
        run_id = start_pipeline_run(
            cfg, {"lmforge.targets": targets, "lmforge.data_digest": data_digest(source_digests(cfg.data), cfg.data)}
        )
        ingest = start_stage_run(uri, run_id, "ingest", {})
        if output:
            MlflowClient(uri).set_tag(ingest, "lmforge.output", output)
        end_run(uri, ingest, True)
        end_run(uri, run_id, ok)
        time.sleep(0.01)
        return run_id

    files = source_digests(cfg.data)
    (ingested / PROVENANCE).write_text("path,sha256\n" + "".join(f"{p},{d.sha256}\n" for p, d in files.items()))
    finished = run(cfg, "all", True, str(ingested))
    start, why = should_retrain(cfg)
    assert not start and why.startswith(f"no new data: run {finished} (finished)"), why

    (corpus / "b.txt").write_text("beta " * 100)
    run(cfg, "ingest", True)  # the new data, but not a whole pipeline run
    run(load_config("tiny", [*overrides, "name=other"]), "all", True)  # the new data, another config
    start, why = should_retrain(cfg)
    assert start and why.endswith(f"since run {finished}"), why

    failed = run(cfg, "all", False)
    start, why = should_retrain(cfg)
    assert not start and why.startswith(f"no new data: run {failed} (failed)"), why
