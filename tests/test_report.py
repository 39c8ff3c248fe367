"""What a reviewer sees: the pipeline's parent run in MLflow (key metrics, description, datasets,
registered model), each stage's figures, and ``lmforge report``. Reads the session's tiny pipeline
runs (``tiny_run`` in conftest.py: the same runs tests/test_pipeline.py checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from lm.tracking.figures import read_loss_history
from lm.tracking.report import comparison_table
from lm.tracking.runs import run_tree

PNG = b"\x89PNG\r\n\x1a\n"


def _client(out: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(out["tracking_uri"])


@pytest.mark.slow
def test_the_parent_run_carries_the_key_metrics_its_model_version_and_its_datasets(tiny_run):
    out = tiny_run["first"]
    tree = run_tree(out["tracking_uri"], out["mlflow_run_id"])
    parent, children = tree["parent"], tree["children"]
    m = parent.data.metrics
    evaluated = json.loads((Path(out["evaluate"]) / "metrics.json").read_text())
    for key in ("eval/accuracy", "eval/macro_f1", "eval/baseline_accuracy", "eval/tfidf_accuracy", "eval/bpb"):
        assert m[key] == pytest.approx(evaluated[key]), key
    clean = children["clean"].data.metrics
    assert (m["clean/docs_in"], m["clean/docs_out"]) == (clean["clean/docs_in"], clean["clean/docs_out"])
    deploy = json.loads((Path(out["deploy"]) / "manifest.json").read_text())
    assert m["deploy/version"] == deploy["metrics"]["deploy/version"]
    assert m["deploy/new_value"] == pytest.approx(evaluated["eval/accuracy"])
    assert 0 < m["pipeline/seconds"] < tiny_run["t_first"] + 1
    assert m["pretrain/val_loss"] == children["pretrain"].data.metrics["val/loss"]

    tags = parent.data.tags
    assert tags["lmforge.model_version"] == deploy["outputs"]["model_uri"]
    assert tags["lmforge.decision"] == "promoted"
    # The model deploy logged is the parent's output, linked to its registered version (the run page's
    # "Registered models" box goes through it).
    [output] = parent.outputs.model_outputs
    model = _client(out).get_logged_model(output.model_id)
    assert model.source_run_id == children["deploy"].info.run_id
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "lmforge-tiny", "version": "1"}]

    datasets = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                for d in parent.inputs.dataset_inputs}
    assert {("documents", "ingest"), ("train", "training"), ("val", "validation"), ("test", "evaluation"),
            ("heldout_tokens", "evaluation")} <= datasets, datasets
    digests = {d.dataset.name: d.dataset.digest for d in children["evaluate"].inputs.dataset_inputs}
    eval_sets = json.loads((Path(out["evaluate"]) / "eval_sets.json").read_text())
    assert digests == {"heldout_tokens": eval_sets["language_model"][:36], "test": eval_sets["method"][:36]}


@pytest.mark.slow
def test_the_description_states_the_decision_the_metrics_beside_baselines_and_the_data(tiny_run):
    first, second = tiny_run["first"], tiny_run["second"]
    note = run_tree(first["tracking_uri"], first["mlflow_run_id"])["parent"].data.tags["mlflow.note.content"]
    evaluated = json.loads((Path(first["evaluate"]) / "metrics.json").read_text())
    first_line = note.splitlines()[0]  # what the UI shows before "Show more"
    assert first_line.startswith("**Promoted** [models:/lmforge-tiny/1](#/models/lmforge-tiny/versions/1) to `@champion`")
    assert f"`eval/accuracy` {evaluated['eval/accuracy']:.4f}" in first_line
    assert "> promoted: no version held \\@champion" in note  # the decision's reason, as deploy gave it
    row = next(line for line in note.splitlines() if line.startswith("| `eval/accuracy` (promotion)"))
    assert f"{evaluated['eval/accuracy']:.4f}" in row
    assert f"{evaluated['eval/baseline_accuracy']:.4f} majority class" in row
    assert f"{evaluated['eval/tfidf_accuracy']:.4f} TF-IDF" in row
    clean = json.loads((Path(first["clean"]) / "stats.json").read_text())["metrics"]
    assert f"| kept | {int(clean['clean/docs_out']):,} documents" in note
    assert "| pretrain | ran |" in note
    clean_run = run_tree(first["tracking_uri"], first["mlflow_run_id"])["children"]["clean"].info.run_id
    assert f"![clean: dropped_by_reason.png](get-artifact?path=dropped_by_reason.png&run_uuid={clean_run})" in note

    # The rerun reuses every stage; its version already holds the alias, and the note says so.
    again = run_tree(second["tracking_uri"], second["mlflow_run_id"])["parent"].data.tags["mlflow.note.content"]
    assert "| pretrain | cached |" in again and "already holds \\@champion" in again
    assert "champion v1" in again


@pytest.mark.slow
def test_each_figure_is_an_image_artifact_of_the_stage_that_made_it(tiny_run, tmp_path):
    out = tiny_run["first"]
    client = _client(out)
    children = run_tree(out["tracking_uri"], out["mlflow_run_id"])["children"]
    for stage, name in (("clean", "length_hist.png"), ("clean", "dropped_by_reason.png"),
                        ("evaluate", "loss_curves.png"), ("evaluate", "confusion.png")):
        path = client.download_artifacts(children[stage].info.run_id, name, str(tmp_path))
        assert Path(path).read_bytes()[:8] == PNG, (stage, name)
    # The loss curves come from the histories both trainings wrote, step by step.
    for stage, steps in (("pretrain", "pretrain.max_steps"), ("finetune", "finetune.max_steps")):
        history = read_loss_history(Path(out[stage]) / "loss_history.csv")
        train_steps = [s for s, _ in history["train/loss"]]
        assert len(train_steps) >= 3 and train_steps == sorted(set(train_steps)), stage
        assert train_steps[-1] <= int(tiny_run["cfg"].value(steps)) and history["val/loss"], stage


def test_a_step_logged_twice_keeps_the_resumed_runs_value(tmp_path):
    path = tmp_path / "loss_history.csv"
    path.write_text("step,metric,value\n5,train/loss,3.0\n10,train/loss,2.5\n10,val/loss,2.6\n"
                    "10,train/loss,2.4\n15,train/loss,2.0\n")  # killed after step 10, resumed from step 5
    assert read_loss_history(path) == {"train/loss": [(5, 3.0), (10, 2.4), (15, 2.0)], "val/loss": [(10, 2.6)]}
    assert read_loss_history(tmp_path / "none.csv") == {}


@pytest.mark.slow
def test_lmforge_report_prints_a_row_per_pipeline_run_with_its_numbers(tiny_run, capsys):
    first, second = tiny_run["first"], tiny_run["second"]
    args = ["report", "--config", "tiny", f"tracking.uri={first['tracking_uri']}", "--last", "20"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:6] == ["run", "trigger", "docs", "metric", "value", "champion"]
    assert header[-4:] == ["decision", "ver", "min", "status"]
    assert max(map(len, lines[1:])) <= 100
    rows = {}
    for out in (first, second):
        name = run_tree(out["tracking_uri"], out["mlflow_run_id"])["parent"].info.run_name
        rows[name] = dict(zip(header, next(line for line in lines if line.startswith(name + " ")).split(), strict=True))
    evaluated = json.loads((Path(first["evaluate"]) / "metrics.json").read_text())
    docs = json.loads((Path(first["clean"]) / "stats.json").read_text())["metrics"]["clean/docs_out"]
    for name, row in rows.items():
        assert (row["metric"], row["value"]) == ("accuracy", f"{evaluated['eval/accuracy']:.4f}"), name
        assert row["docs"] == f"{int(docs):,}" and row["status"] == "ok", name
    older, newer = sorted(rows)  # names carry their start time
    assert lines.index(next(x for x in lines if x.startswith(newer))) < lines.index(next(x for x in lines if x.startswith(older)))
    assert rows[older]["decision"] == "promoted" and rows[older]["champion"] == "-"
    assert rows[older]["ver"] == rows[newer]["ver"] == "v1"
    assert rows[newer]["champion"] == rows[newer]["value"]  # it was compared with itself: it holds the alias

    assert main(["report", "--config", "tiny", f"tracking.uri={first['tracking_uri']}", "--last", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # the title, the header, one run


def test_report_on_a_store_without_runs_says_so(tmp_path, capsys):
    assert main(["report", "--config", "tiny", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    assert "no pipeline runs in experiment 'lmforge'" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()  # reading created no store


def test_the_comparison_table_fits_100_columns_and_shows_what_is_missing():
    runs = [
        {"name": f"classify-2026120{i}-031500", "start": 0, "end": 600_000, "status": status,
         "metrics": metrics, "tags": tags}
        for i, (status, metrics, tags) in enumerate([
            ("FINISHED", {"eval/accuracy": 0.8234, "eval/macro_f1": 0.81, "eval/bpb": 1.85, "eval/loss": 4.2,
                          "clean/docs_out": 12345, "deploy/champion_value": 0.8012, "pipeline/seconds": 750},
             {"lmforge.trigger": "new-data", "lmforge.promote_metric": "eval/accuracy",
              "lmforge.decision": "promoted", "lmforge.model_version": "models:/lmforge-demo/12"}),
            ("FAILED", {}, {}),
        ])
    ]
    text = comparison_table(runs)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100 and len(lines) == 3
    head, ok, failed = (line.split() for line in lines)
    ok = dict(zip(head, ok, strict=True))
    assert ok["trigger"] == "new-data" and ok["docs"] == "12,345"
    assert (ok["metric"], ok["value"]) == ("accuracy", "0.8234")
    assert ok["champion"] == "0.8012" and ok["min"] == "12.5" and ok["status"] == "ok"
    assert ok["decision"] == "promoted" and ok["ver"] == "v12"
    assert failed[1:3] == ["-", "-"] and failed[-1] == "failed" and failed[-2] == "10.0"  # from start/end
    assert comparison_table([]) == "no pipeline runs yet"


def test_runs_of_two_tasks_in_one_experiment_each_name_their_promotion_metric():
    def run(name, metric, value, champion, extra):
        return {"name": name, "start": 0, "end": 60_000, "status": "FINISHED",
                "metrics": {metric: value, "deploy/champion_value": champion, **extra},
                "tags": {"lmforge.promote_metric": metric}}

    lines = comparison_table([run("sft", "eval/chrf", 31.5, 30.25, {"eval/exact_match": 0.25}),
                              run("cls", "eval/accuracy", 0.8, 0.75, {})]).splitlines()
    head = lines[0].split()
    sft, cls = (dict(zip(head, line.split(), strict=True)) for line in lines[1:])
    assert (sft["metric"], sft["value"], sft["champion"]) == ("chrf", "31.5000", "30.2500")
    assert (cls["metric"], cls["value"], cls["champion"]) == ("accuracy", "0.8000", "0.7500")
    assert "exact_match" in head and (sft["exact_match"], cls["exact_match"]) == ("0.2500", "-")  # short names: room



def test_the_description_has_its_sections_in_order_byte_for_byte():
    """Every section of the parent run's description on one input: the decision, the run, the key
    metrics (a champion measured on another set), the data, the stages, the pictures."""
    from lm.tracking.report import Champion, StageRun, summary_markdown

    stages = {
        "ingest": StageRun({"ingest/documents": 12345, "ingest/bytes": 6867560}, seconds=1.25),
        "clean": StageRun({"clean/docs_filtered": 10, "clean/dropped/too_short": 7, "clean/dropped/lang": 3,
                           "clean/dropped/none": 0, "dedup/exact_dups": 4, "dedup/near_dups": 2,
                           "clean/docs_out": 12000, "clean/bytes_out": 6100000, "clean/train_docs": 11000,
                           "clean/val_docs": 1000}, tags={"lmforge.cached": "true"}, seconds=3.0),
        "tokenize": StageRun({"tokenize/train_tokens": 1.5e6, "tokenize/val_tokens": 2500}),
        "evaluate": StageRun({"eval/accuracy": 0.81234, "eval/baseline_accuracy": 0.5, "eval/tfidf_accuracy": 0.7,
                              "eval/macro_f1": 0.8, "eval/bpb": 1.9, "eval/baseline_bpb": 8.0}, seconds=12.0),
        "deploy": StageRun({"deploy/new_value": 0.81234, "deploy/champion_value": 0.83, "deploy/version": 3},
                           {"deploy.promote_metric": "eval/accuracy", "deploy.alias": "champion"},
                           {"lmforge.decision": "kept", "lmforge.decision_reason": "kept: not better than @champion"},
                           2.5),
    }
    note = summary_markdown(
        run_name="tiny-20260101-000000", config="tiny", targets="all", commit="0123456789abcdef", seconds=754.2,
        stages=stages, champion=Champion("2", {"eval/accuracy": 0.79, "eval/macro_f1": 0.7}, same_set=False),
        model_version="models:/m/3", model_link="#/models/m/versions/3",
        figures=[("clean: a.png", "get-artifact?path=a.png&run_uuid=1")],
    )
    assert note == (
        "**Kept** [models:/m/3](#/models/m/versions/3) as challenger (`@champion` stays on v2): `eval/accuracy` 0.8123 against 0.8300 for champion v2.\n"
        "\n"
        "> kept: not better than \\@champion\n"
        "\n"
        "Pipeline run `tiny-20260101-000000`: config `tiny`, stages: all, 12.6 min, git `0123456789`.\n"
        "\n"
        "### Key metrics\n"
        "\n"
        "| metric | this run | champion v2 | baselines (same data) |\n"
        "|---|---:|---:|---|\n"
        "| `eval/accuracy` (promotion) | 0.8123 | 0.8300 | 0.5000 majority class, 0.7000 TF-IDF + logistic regression |\n"
        "| `eval/macro_f1` | 0.8000 | 0.7000 | - |\n"
        "| `eval/bpb` | 1.9000 | - | 8.0000 unigram |\n"
        "\n"
        "The champion's numbers other than the promotion metric were measured on its own evaluation set, not this run's.\n"
        "\n"
        "### Data\n"
        "\n"
        "| | count | detail |\n"
        "|---|---:|---|\n"
        "| ingested | 12,345 documents | 6.9 MB |\n"
        "| dropped by the filters | 10 documents | too_short 7, lang 3 |\n"
        "| dropped as duplicates | 6 documents | exact 4, near 2 |\n"
        "| kept | 12,000 documents | 6.1 MB; train 11,000, validation 1,000 |\n"
        "| tokens | 1.5 M train | 2.5 k validation |\n"
        "\n"
        "### Stages\n"
        "\n"
        "| stage | | seconds |\n"
        "|---|---|---:|\n"
        "| ingest | ran | 1.2 |\n"
        "| clean | cached | 3.0 |\n"
        "| tokenize | ran | - |\n"
        "| evaluate | ran | 12.0 |\n"
        "| deploy | ran | 2.5 |\n"
        "\n"
        "### Pictures\n"
        "\n"
        "Each is an artifact of the stage that drew it (its child run, Artifacts tab); a generative model's answers are the evaluate stage's generations table.\n"
        "\n"
        "![clean: a.png](get-artifact?path=a.png&run_uuid=1)\n"
    )
