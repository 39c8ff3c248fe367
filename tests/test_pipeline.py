"""End to end: conf/tiny.yaml through the real Prefect engine into a real MLflow sqlite store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lm.tracking import STAGES, run_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, tmp_path_factory):
    """Run the whole tiny pipeline twice with nothing changed; yield both results and timings."""
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("e2e")
    overrides = [f"workdir={tmp / 'runs'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    t0 = time.monotonic()
    first = pipeline(config_file="tiny", overrides=overrides)
    t1 = time.monotonic()
    second = pipeline(config_file="tiny", overrides=overrides)
    t2 = time.monotonic()
    return {"first": first, "second": second, "t_first": t1 - t0, "t_second": t2 - t1, "tmp": tmp}


def test_run_tree_has_a_child_per_stage_with_results(tiny_run):
    out = tiny_run["first"]
    tree = run_tree(out["tracking_uri"], out["mlflow_run_id"])
    assert tree["parent"].info.status == "FINISHED"
    assert tree["parent"].data.tags.get("lmforge.prefect_flow_run_id")
    children = tree["children"]
    assert set(STAGES) <= set(children), sorted(children)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out["tracking_uri"])
    for stage in STAGES:
        run = children[stage]
        assert run.info.status == "FINISHED", stage
        has_artifacts = bool(client.list_artifacts(run.info.run_id))
        assert run.data.metrics or has_artifacts, f"stage {stage} logged nothing"
    assert children["pretrain"].data.params["model.n_layer"] == "2"
    assert children["tokenize"].data.params["tokenizer.vocab_size"] == "512"
    pre = children["pretrain"].data.metrics
    assert "train/loss" in pre and "val/loss" in pre
    history = client.get_metric_history(children["pretrain"].info.run_id, "train/loss")
    assert len(history) >= 2, "training logged its loss only once"
    ev = children["evaluate"].data.metrics
    for key in ("val/loss", "val/ppl", "eval/bpb", "eval/accuracy", "eval/macro_f1", "eval/baseline_accuracy"):
        assert key in ev, key
    assert children["ingest"].inputs.dataset_inputs, "ingest logged no dataset lineage"


def test_model_registered_with_alias_and_loadable(tiny_run):
    import mlflow
    import pandas as pd

    out = tiny_run["first"]
    deploy = json.loads((Path(out["deploy"]) / "manifest.json").read_text())
    client = mlflow.tracking.MlflowClient(out["tracking_uri"])
    version = client.get_model_version_by_alias("lmforge-tiny", "champion")
    assert deploy["outputs"]["model_uri"].endswith(f"/{version.version}")
    mlflow.set_tracking_uri(out["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/lmforge-tiny@champion")
    pred = model.predict(pd.DataFrame({"text": ["Return the JSON encoding of obj.", "Send an e-mail message."]}))
    labels = json.loads((Path(out["export"]) / "labels.json").read_text())
    assert len(pred) == 2 and set(pred["label"]) <= set(labels)


def test_second_run_reuses_finished_stages(tiny_run):
    first, second = tiny_run["first"], tiny_run["second"]
    for stage in ("ingest", "clean", "tokenize", "pretrain", "finetune", "export"):
        assert first[stage] == second[stage]
    tree = run_tree(second["tracking_uri"], second["mlflow_run_id"])
    for stage in ("ingest", "clean", "tokenize", "pretrain", "finetune", "evaluate", "export"):
        assert tree["children"][stage].data.tags["lmforge.cached"] == "true", stage
    # The same export is not registered twice.
    d1 = json.loads((Path(first["deploy"]) / "manifest.json").read_text())
    d2 = json.loads((Path(second["deploy"]) / "manifest.json").read_text())
    assert d1["outputs"]["model_uri"] == d2["outputs"]["model_uri"]
    assert tiny_run["t_second"] < tiny_run["t_first"] / 2, (tiny_run["t_first"], tiny_run["t_second"])


def test_classifier_beats_majority_baseline(tiny_run):
    metrics = json.loads((Path(tiny_run["first"]["evaluate"]) / "metrics.json").read_text())
    assert metrics["eval/accuracy"] > metrics["eval/baseline_accuracy"], metrics
