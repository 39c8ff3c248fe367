"""End to end: conf/tiny.yaml through the real Prefect engine into a real MLflow sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm.config import load_config
from lm.pipeline.stage import wanted
from lm.pipeline.workspace import config_values
from lm.stages import STAGES
from lm.tracking.runs import run_tree

pytestmark = pytest.mark.slow


# tiny_run (conftest.py): the whole tiny pipeline, run twice with nothing changed, once per session.


def test_run_tree_has_a_child_per_stage_with_results(tiny_run):
    out = tiny_run["first"]
    tree = run_tree(out["tracking_uri"], out["mlflow_run_id"])
    assert tree["parent"].info.status == "FINISHED"
    assert tree["parent"].data.tags.get("lmforge.prefect_flow_run_id")
    children = tree["children"]
    ran = wanted(STAGES, tiny_run["cfg"])  # the rows this config runs (align only when align.task is set)
    assert set(children) == {s.name for s in ran} and "align" not in children, sorted(children)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out["tracking_uri"])
    for stage in ran:
        run = children[stage.name]
        assert run.info.status == "FINISHED", stage.name
        has_artifacts = bool(client.list_artifacts(run.info.run_id))
        assert run.data.metrics or has_artifacts, f"stage {stage.name} logged nothing"
        # Its params: the config keys of its row in the stage table, with the values in force.
        expected = {k: str(v) for k, v in config_values(tiny_run["cfg"], stage).items() if v is not None}
        assert expected.items() <= run.data.params.items(), stage.name
    assert children["pretrain"].data.params["model.n_layer"] == "2"
    assert children["tokenize"].data.params["tokenizer.vocab_size"] == "512"
    assert children["finetune"].data.params["finetune.lr"] == "0.003"
    assert "pretrain.lr" not in children["finetune"].data.params
    pre = children["pretrain"].data.metrics
    assert "train/loss" in pre and "val/loss" in pre
    history = client.get_metric_history(children["pretrain"].info.run_id, "train/loss")
    assert len(history) >= 2, "training logged its loss only once"
    ev = children["evaluate"].data.metrics
    for key in ("eval/loss", "eval/ppl", "eval/bpb", "eval/accuracy", "eval/macro_f1", "eval/baseline_accuracy"):
        assert key in ev, key
    assert not [k for k in ev if k.startswith("val/")]  # evaluation's numbers never pose as training's
    assert children["ingest"].inputs.dataset_inputs, "ingest logged no dataset lineage"


def test_model_registered_with_alias_and_loadable(tiny_run):
    import mlflow
    import pandas as pd

    out = tiny_run["first"]
    deploy = json.loads((Path(out["deploy"]) / "manifest.json").read_text())
    client = mlflow.tracking.MlflowClient(out["tracking_uri"])
    version = client.get_model_version_by_alias("lmforge-tiny", "champion")
    assert deploy["outputs"]["model_uri"].endswith(f"/{version.version}")
    # Every version says what it was measured on and why it holds (or not) the alias; so does the deploy run.
    assert len(version.tags["lmforge.eval_set"]) == 64 and version.tags["lmforge.decision"] == "promoted"
    assert version.tags["lmforge.promote_metric"] == "eval/accuracy"
    run = run_tree(out["tracking_uri"], out["mlflow_run_id"])["children"]["deploy"]
    assert run.data.tags["lmforge.decision"] == "promoted" and run.data.tags["lmforge.decision_reason"]
    assert run.data.params["eval_set"] == version.tags["lmforge.eval_set"]
    assert run.data.params["deploy.promote_margin"] == "0.0"
    assert str(client.get_model_version_by_alias("lmforge-tiny", "challenger").version) == str(version.version)
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


def test_no_path_of_the_training_machine_in_the_export_or_the_registered_model(tiny_run):
    import mlflow

    out = tiny_run["first"]
    local = mlflow.artifacts.download_artifacts(
        "models:/lmforge-tiny@champion", dst_path=str(tiny_run["tmp"] / "downloaded"), tracking_uri=out["tracking_uri"]
    )
    roots = [str(tiny_run["tmp"]), str(Path(__file__).resolve().parent.parent), str(Path.home())]
    for folder in (Path(out["export"]), Path(local)):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files
        for path in files:
            data = path.read_bytes()
            for root in roots:
                assert root.encode() not in data, f"{path} names {root}"


def test_the_registered_model_carries_its_code_and_installable_requirements(tiny_run):
    import importlib.metadata

    import mlflow
    from packaging.requirements import Requirement

    mlflow.set_tracking_uri(tiny_run["first"]["tracking_uri"])
    reqs = mlflow.pyfunc.get_model_dependencies("models:/lmforge-tiny@champion")
    lines = [ln for ln in Path(reqs).read_text().splitlines() if ln and not ln.startswith("#")]
    names = set()
    for line in lines:
        req = Requirement(line)
        names.add(req.name.lower())
        # Every requirement is a published package, pinned to a version this environment runs.
        assert importlib.metadata.version(req.name).split("+")[0] in req.specifier, line
    assert "lmforge" not in names and {"torch", "tokenizers", "safetensors"} <= names


def test_params_are_the_values_in_force_for_every_tokenizer_kind(prefect_harness, tmp_path):
    """tokenizer.kind=byte used to die in the tokenize stage: the preset's vocab_size was logged, then
    the tokenizer's own, and MLflow refuses to change a param."""
    from flows.pipeline import pipeline

    base = ["pretrain.max_steps=2", f"workdir={tmp_path / 'w'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    byte = pipeline(config=load_config("tiny", [*base, "tokenizer.kind=byte"]), targets=["tokenize"])
    params = run_tree(byte["tracking_uri"], byte["mlflow_run_id"])["children"]["tokenize"].data.params
    assert params["tokenizer.vocab_size"] == "261" and params["tokenizer.kind"] == "byte"
    path = Path(byte["tokenize"]) / "tokenizer.json"
    given = pipeline(config=load_config("tiny", [*base, "tokenizer.kind=file", f"tokenizer.path={path}"]),
                     targets=["tokenize"])
    params = run_tree(given["tracking_uri"], given["mlflow_run_id"])["children"]["tokenize"].data.params
    assert params["tokenizer.vocab_size"] == "261"  # the file's size, logged once the stage read it


def _not_rescored(model_dir: Path, scratch: Path) -> dict[str, float]:
    raise AssertionError("the champion was measured on this evaluation set: nothing to re-score")


def _deploy_run_id(out: dict) -> str:
    return run_tree(out["tracking_uri"], out["mlflow_run_id"])["children"]["deploy"].info.run_id


def test_the_alias_moves_only_to_a_better_version_in_the_configured_direction(tiny_run):
    from mlflow.tracking import MlflowClient

    from lm.config import DeployConfig
    from lm.tracking.registry import EVAL_SET_TAG, deploy

    out = tiny_run["first"]
    uri, export = out["tracking_uri"], Path(out["export"])
    client = MlflowClient(uri)
    run_id = _deploy_run_id(out)
    champion = client.get_model_version_by_alias("lmforge-tiny", "champion")
    accuracy = float(champion.tags["eval/accuracy"])
    same = {"eval_set": champion.tags[EVAL_SET_TAG], "rescore": _not_rescored}
    cfg = DeployConfig(model_name="lmforge-tiny", promote_metric="eval/accuracy", promote_mode="max")
    worse = deploy(cfg, uri, run_id, export, "worse-export", {"eval/accuracy": accuracy - 0.1}, **same)
    assert worse.metrics["deploy/promoted"] == 0.0
    assert client.get_model_version_by_alias("lmforge-tiny", "champion").version == champion.version
    assert str(client.get_model_version_by_alias("lmforge-tiny", "challenger").version) == worse.outputs["model_uri"].split("/")[-1]
    # For a metric where lower is better, the lower value wins.
    lower = cfg.model_copy(update={"promote_metric": "eval/bpb", "promote_mode": "min"})
    bpb = float(champion.tags["eval/bpb"])
    better = deploy(lower, uri, run_id, export, "lower-bpb-export", {"eval/bpb": bpb - 0.5}, **same)
    assert better.metrics["deploy/promoted"] == 1.0
    assert str(client.get_model_version_by_alias("lmforge-tiny", "champion").version) == better.outputs["model_uri"].split("/")[-1]


def test_a_version_better_by_less_than_the_margin_stays_challenger(tiny_run):
    from mlflow.tracking import MlflowClient

    from lm.config import DeployConfig
    from lm.tracking.registry import HISTORY_TAG, deploy, rollback

    out = tiny_run["first"]
    uri, export, run_id = out["tracking_uri"], Path(out["export"]), _deploy_run_id(out)
    client = MlflowClient(uri)
    name = "lmforge-tiny-margin"
    cfg = DeployConfig(model_name=name, promote_metric="eval/accuracy", promote_margin=0.05)

    def register(key: str, accuracy: float):
        result = deploy(cfg, uri, run_id, export, key, {"eval/accuracy": accuracy}, eval_set="set-a",
                        rescore=_not_rescored)
        return result, result.outputs["model_uri"].split("/")[-1]

    _, v1 = register("margin-1", 0.50)
    close, v2 = register("margin-2", 0.53)
    assert close.metrics["deploy/promoted"] == 0.0 and close.metrics["deploy/champion_value"] == 0.50
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v2
    tags = client.get_model_version(name, v2).tags
    assert tags["lmforge.decision"] == "kept" and tags["lmforge.champion_scored"] == "same_set"
    assert tags["lmforge.champion_version"] == v1 and float(tags["lmforge.champion_value"]) == 0.50
    assert "less than the margin 0.05" in tags["lmforge.decision_reason"]
    assert close.tags["lmforge.decision"] == "kept" and close.params["champion_version"] == v1

    clear, v3 = register("margin-3", 0.56)
    assert clear.metrics["deploy/promoted"] == 1.0
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    assert client.get_model_version(name, v3).tags["lmforge.decision"] == "promoted"
    assert json.loads(client.get_registered_model(name).tags[HISTORY_TAG.format(alias="champion")]) == [v1, v3]
    # The same export registered again is the same version, and it keeps the alias.
    again, v3_again = register("margin-3", 0.56)
    assert v3_again == v3 and again.params["reused_version"] is True and again.metrics["deploy/promoted"] == 1.0
    # Rolled back by a person, a rerun of the same export does not take the alias back.
    rollback(uri, name)
    rerun, _ = register("margin-3", 0.56)
    assert rerun.metrics["deploy/promoted"] == 0.0 and rerun.params["champion_scored"] == "not_compared"
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


def test_a_champion_measured_on_other_data_is_rescored_on_the_new_evaluation_set(tiny_run, tmp_path):
    import shutil

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from lm.finetune import method
    from lm.pipeline.evaluate import evaluation_set_digest, rescore
    from lm.tracking.registry import deploy

    out, cfg = tiny_run["first"], tiny_run["cfg"]
    uri, export, run_id = out["tracking_uri"], Path(out["export"]), _deploy_run_id(out)
    data, tokens = Path(out["finetune_data"]), Path(out["tokenize"])
    client = MlflowClient(uri)
    name = "lmforge-tiny-rescore"
    deploy_cfg = cfg.deploy.model_copy(update={"model_name": name})
    metrics = json.loads((Path(out["evaluate"]) / "metrics.json").read_text())
    first = deploy(deploy_cfg, uri, run_id, export, "rescore-1", metrics,
                   eval_set=evaluation_set_digest(cfg, data, tokens), rescore=_not_rescored)
    v1 = first.outputs["model_uri"].split("/")[-1]

    # A new evaluation set: the test examples this model labels right. The champion is this very
    # export, so on the new set it scores 1.0, where the evaluate stage measured less.
    other = tmp_path / "finetune_data"
    shutil.copytree(data, other)
    test = pd.read_parquet(other / "test.parquet")
    right = method("classify").Predictor(export).probabilities(test["text"].tolist()).argmax(-1) == test["label"]
    assert 0 < right.sum() < len(test)
    test[right].to_parquet(other / "test.parquet")
    new_set = evaluation_set_digest(cfg, other, tokens)
    assert new_set != client.get_model_version(name, v1).tags["lmforge.eval_set"]
    # The language model's metrics come from the validation shards: a new test split leaves them comparable.
    on_bpb = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"promote_metric": "eval/bpb"})})
    assert evaluation_set_digest(on_bpb, other, tokens) == evaluation_set_digest(on_bpb, data, tokens) != new_set
    on_new_set = 1.0

    def rescore_on_new_set(model_dir: Path, scratch: Path) -> dict[str, float]:
        return rescore(cfg, model_dir, other, tokens, out_dir=scratch)

    second = deploy(deploy_cfg, uri, run_id, export, "rescore-2", {**metrics, "eval/accuracy": on_new_set},
                    eval_set=new_set, rescore=rescore_on_new_set)
    v2 = second.outputs["model_uri"].split("/")[-1]
    tags = client.get_model_version(name, v2).tags
    assert tags["lmforge.champion_scored"] == "rescored" and tags["lmforge.champion_version"] == v1
    assert float(tags["lmforge.champion_value"]) == pytest.approx(on_new_set)
    assert second.metrics["deploy/champion_value"] == pytest.approx(on_new_set)
    assert "champion re-scored on this evaluation set" in tags["lmforge.decision_reason"]
    assert tags["lmforge.decision"] == "kept"  # a tie on the same data is not an improvement
    assert second.params["champion_scored"] == "rescored" and second.params["eval_set"] == new_set

    # Once re-scored on a set, the champion's number there is kept on it and not computed again.
    third = deploy(deploy_cfg, uri, run_id, export, "rescore-3", {**metrics, "eval/accuracy": on_new_set + 0.1},
                   eval_set=new_set, rescore=_not_rescored)
    assert third.metrics["deploy/promoted"] == 1.0 and third.params["champion_scored"] == "rescored"

    # A run that trained another tokenizer (a retrain from scratch): the champion reads the test
    # split with its own, so accuracy, measured on labels, is re-scored (a tie: kept) ...
    odd_tokens = tmp_path / "tokens"
    odd_tokens.mkdir()
    shutil.copy(tokens / "index.json", odd_tokens / "index.json")
    (odd_tokens / "tokenizer.json").write_text((tokens / "tokenizer.json").read_text() + "\n")

    def rescore_other_tokenizer(model_dir: Path, scratch: Path) -> dict[str, float]:
        return rescore(cfg, model_dir, other, odd_tokens, out_dir=scratch)

    fourth = deploy(deploy_cfg, uri, run_id, export, "rescore-4", {**metrics, "eval/accuracy": 1.0},
                    eval_set="a-set-of-another-tokenizer", rescore=rescore_other_tokenizer)
    tags = client.get_model_version(name, fourth.outputs["model_uri"].split("/")[-1]).tags
    assert tags["lmforge.champion_scored"] == "rescored", tags["lmforge.decision_reason"]
    assert float(tags["lmforge.champion_value"]) == pytest.approx(on_new_set) and tags["lmforge.decision"] == "kept"
    scores = rescore(cfg, export, other, odd_tokens, out_dir=tmp_path)
    assert scores["eval/accuracy"] == pytest.approx(on_new_set) and "eval/loss" not in scores and "eval/bpb" not in scores

    # ... but a number measured per token (bits per byte of the validation windows) is not: the alias
    # stays, and the tag says why.
    on_bpb_cfg = on_bpb.deploy.model_copy(update={"model_name": name, "promote_mode": "min"})

    def rescore_bpb_other_tokenizer(model_dir: Path, scratch: Path) -> dict[str, float]:
        return rescore(on_bpb, model_dir, other, odd_tokens, out_dir=scratch)

    fifth = deploy(on_bpb_cfg, uri, run_id, export, "rescore-5", {**metrics, "eval/bpb": 0.1},
                   eval_set="a-set-of-another-tokenizer", rescore=rescore_bpb_other_tokenizer)
    v5 = fifth.outputs["model_uri"].split("/")[-1]
    tags = client.get_model_version(name, v5).tags
    assert fifth.metrics["deploy/promoted"] == 0.0 and tags["lmforge.champion_scored"] == "unavailable"
    assert "could not be re-scored" in tags["lmforge.decision_reason"]
    assert "tokenizer differs" in tags["lmforge.decision_reason"] and "per token" in tags["lmforge.decision_reason"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v5


def test_mlflow_models_serve_answers_with_the_champion_classifier(tiny_run, tmp_path):
    from scoring_server import invoke, mlflow_models_serve

    out = tiny_run["first"]
    labels = json.loads((Path(out["export"]) / "labels.json").read_text())
    texts = ["Return the JSON encoding of obj.", "Split the string s using shell-like syntax."]
    with mlflow_models_serve("models:/lmforge-tiny@champion", out["tracking_uri"], tmp_path / "serve.log") as url:
        split = invoke(url, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}})
        records = invoke(url, {"dataframe_records": [{"text": t} for t in texts]})
    assert split == records
    rows = split["predictions"]
    assert len(rows) == 2 and all(row["label"] in labels and 0.0 < row["score"] <= 1.0 for row in rows), rows


def test_fine_tuning_starts_from_a_registered_model_with_its_tokenizer(tiny_run):
    """model.init_from=models:/NAME/VERSION: the registered model's decoder and tokenizer are the
    base; pretraining is skipped; the registry's version is part of the key."""
    from flows.pipeline import pipeline

    first, tmp = tiny_run["first"], tiny_run["tmp"]
    cfg = load_config(
        "tiny",
        [f"workdir={tmp / 'runs'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
         "model.init_from=models:/lmforge-tiny/1", "finetune.max_steps=4"],
    )
    out = pipeline(config=cfg, targets=["finetune"])
    source = json.loads((Path(out["base_model"]) / "source.json").read_text())
    assert source["kind"] == "registered" and source["version"] == "1" and source["tokenizer"]
    assert json.loads((Path(out["pretrain"]) / "result.json").read_text())["skipped"] is True
    # The tokenizer the registered model was trained with, not a new one learned from the corpus.
    assert (Path(out["tokenize"]) / "tokenizer.json").read_text() == (Path(first["tokenize"]) / "tokenizer.json").read_text()
    children = run_tree(out["tracking_uri"], out["mlflow_run_id"])["children"]
    assert children["base_model"].data.params["base_model.kind"] == "registered"
    assert children["base_model"].data.params["model.init_from"] == "models:/lmforge-tiny/1"
    assert children["finetune"].info.status == "FINISHED"


def test_the_classifier_export_carries_its_decoder_as_a_hugging_face_folder(tiny_run):
    import torch
    transformers = pytest.importorskip("transformers")

    from lm.models.folder import load_model

    export = Path(tiny_run["first"]["export"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(export / "hf").eval()
    ours = load_model(export / "lm")
    idx = torch.randint(0, ours.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, ours(idx)[0], atol=1e-4)
    assert "not instruction-tuned" in (export / "hf" / "README.md").read_text()


def test_a_warm_start_from_the_champion_keeps_its_tokens_and_encodes_nothing_again(tiny_run):
    """model.init_from=models:/NAME@champion brings the champion's tokenizer (registry -> base_model
    -> tokenize, the bytes unchanged on the way), so tokenize copies the earlier run's tokens."""
    from lm.pipeline.stage import StageContext, StageResult, execute, is_complete, stage_by_name
    from lm.pipeline.workspace import stage_dirs

    out = tiny_run["first"]
    cfg = load_config("tiny", [f"workdir={tiny_run['cfg'].workdir}", f"tracking.uri={out['tracking_uri']}",
                               "model.init_from=models:/lmforge-tiny@champion"])
    stages = [stage_by_name(STAGES, name) for name in ("ingest", "clean", "base_model", "tokenize")]
    dirs = stage_dirs(cfg, stages)
    assert dirs["clean"] == Path(out["clean"]) and dirs["tokenize"] != Path(out["tokenize"])
    for stage in stages:
        if not is_complete(dirs[stage.name]):
            execute(stage, StageContext(cfg, {name: dirs[name] for name in stage.inputs}, dirs[stage.name]))
    result = StageResult.load(dirs["tokenize"])
    assert result.metrics["tokenize/docs_encoded"] == 0 and result.metrics["tokenize/docs_reused"] > 0
    # It extends the newest tokenize of this pipeline made with that tokenizer (other tests of the
    # session may have made one since the first run).
    extended = Path(result.tags["lmforge.extends"])
    assert (extended / "tokenizer.json").read_bytes() == (Path(out["tokenize"]) / "tokenizer.json").read_bytes()
    for name in ("tokenizer.json", "train_00000.bin", "val_00000.bin"):
        assert (dirs["tokenize"] / name).read_bytes() == (Path(out["tokenize"]) / name).read_bytes(), name
