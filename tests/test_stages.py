"""A stage is one row of a table: a toy table (test-only) gets its folders, child runs with params,
Prefect subflows and CLI commands without a line anywhere else."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from flows.cli import _parser, commands, main
from lm.config import load_config
from lm.pipeline.stage import Stage, StageContext, StageResult, needed
from lm.pipeline.workspace import stage_dirs
from lm.stages import STAGES, stages_for
from lm.tracking.runs import run_tree


def _count(ctx: StageContext) -> StageResult:
    n = ctx.cfg.evaluate.max_batches
    (ctx.out_dir / "count.json").write_text(json.dumps({"n": n}))
    return StageResult(
        metrics={"toy/count": float(n)}, params={"toy.unit": "batches"}, artifacts=["count.json"]
    )


def _double(ctx: StageContext) -> StageResult:
    n = json.loads((ctx.inputs["count"] / "count.json").read_text())["n"]
    (ctx.out_dir / "double.json").write_text(json.dumps({"n": 2 * n, "alias": ctx.cfg.deploy.alias}))
    return StageResult(metrics={"toy/double": 2.0 * n})


TOYS = (
    Stage(
        "count",
        _count,
        "count the evaluation batches",
        config=("evaluate.max_batches",),
        outputs=("count.json",),
        group="toys",
    ),
    Stage(
        "double_it",
        _double,
        "double the count",
        inputs=("count",),
        config=("deploy.alias",),
        outputs=("double.json",),
        group="toys",
    ),
)


def test_the_real_table_is_in_order_and_names_each_stage_once():
    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(STAGES):
        assert set(stage.inputs) <= set(names[:i]), f"{stage.name} reads a stage that runs after it"
    assert [s.name for s in stages_for(["pretrain"])] == ["ingest", "clean", "base_model", "tokenize", "pretrain"]
    data = ["ingest", "clean", "base_model", "tokenize", "finetune_data"]
    assert [s.name for s in stages_for(["data"], STAGES, load_config("tiny"))] == data
    assert [s.name for s in stages_for(["data"], STAGES, load_config("tiny", ["align.task=dpo"]))] == [*data, "align_data"]
    assert [s.name for s in needed(TOYS, ["double_it"])] == ["count", "double_it"]


def test_a_toy_stage_gets_a_folder_and_a_cli_command(tmp_path):
    cfg = load_config("tiny", [f"workdir={tmp_path}"])
    folders = stage_dirs(cfg, TOYS)
    assert (
        folders["count"].parent == tmp_path / "count"
        and folders["double_it"].parent == tmp_path / "double_it"
    )
    help_text = _parser(TOYS).format_help()
    for command in ("run", "toys", "count", "double-it"):
        assert command in help_text
    assert "double the count" in help_text


@pytest.mark.slow  # the session's Prefect server, a few seconds of flows
def test_a_toy_table_runs_through_prefect_into_mlflow_from_the_cli(prefect_harness, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "double-it",
        "--config",
        "tiny",
        f"workdir={tmp_path / 'w'}",
        f"tracking.uri={uri}",
        "evaluate.max_batches=21",
    ]
    assert main(args, table=TOYS) == 0, capsys.readouterr().err
    cfg = load_config("tiny", args[3:])
    folders = stage_dirs(cfg, TOYS)
    assert json.loads((folders["double_it"] / "double.json").read_text()) == {"n": 42, "alias": "champion"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("lmforge").experiment_id],
        filter_string="tags.`lmforge.targets` = 'double_it'",
    )[0]
    children = run_tree(uri, parent.info.run_id)["children"]
    assert set(children) == {"count", "double_it"}
    # Each child run: the config keys of its row as params (and what the stage decided), its metrics.
    assert children["count"].data.params == {"evaluate.max_batches": "21", "toy.unit": "batches"}
    assert children["double_it"].data.params == {"deploy.alias": "champion"}
    assert children["double_it"].data.metrics["toy/double"] == 42.0
    assert children["count"].data.tags["lmforge.cached"] == "false"

    # Again, unchanged: both come from cache; a changed key reruns only the stage that reads it.
    assert main(args, table=TOYS) == 0
    assert main([*args[:-1], "evaluate.max_batches=21", "deploy.alias=best"], table=TOYS) == 0
    runs = client.search_runs([parent.info.experiment_id], filter_string="attributes.run_name = 'count'")
    assert sorted(r.data.tags["lmforge.cached"] for r in runs) == ["false", "true", "true"]
    runs = client.search_runs([parent.info.experiment_id], filter_string="attributes.run_name = 'double_it'")
    assert sorted(r.data.tags["lmforge.cached"] for r in runs) == ["false", "false", "true"]
    assert len(list((tmp_path / "w" / "double_it").iterdir())) == 2  # one folder per distinct input
    assert Path(folders["count"]).is_dir()


def test_a_run_that_finishes_second_keeps_the_folder_the_first_published(tmp_path):
    """Two runs computing the same stage at once: the later one finds the folder finished, leaves it
    (the first run may be reading it) and returns its result; a stage that always reruns replaces it."""
    from dataclasses import replace

    from lm.config import Config
    from lm.pipeline.stage import execute

    out = tmp_path / "count" / "key"

    def first_publishes_meanwhile(ctx: StageContext) -> StageResult:
        out.mkdir(parents=True)
        (out / "count.json").write_text('{"n": "first"}')
        StageResult(metrics={"toy/count": 1.0}).save(out)
        return _count(ctx)

    stage = replace(TOYS[0], run=first_publishes_meanwhile)
    result = execute(stage, StageContext(Config(), {}, out))
    assert json.loads((out / "count.json").read_text()) == {"n": "first"}
    assert result.metrics == {"toy/count": 1.0}
    assert [p.name for p in out.parent.iterdir()] == ["key"]  # nothing of the second run left behind

    always = replace(TOYS[0], cached=False)
    execute(always, StageContext(Config(), {}, out))
    assert json.loads((out / "count.json").read_text()) == {"n": Config().evaluate.max_batches}
    assert [p.name for p in out.parent.iterdir()] == ["key"]


# ---- a second fine-tuning step (align), a pair of rows a config switches on -------------------------

BEFORE_ALIGN = tuple(replace(s, inputs=tuple(n for n in s.inputs if not n.startswith("align")))
                     for s in STAGES if not s.name.startswith("align"))  # the table as it was without the step


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_a_config_without_align_runs_and_keys_every_stage_as_the_table_without_it(tmp_path, preset):
    from lm.pipeline.workspace import stage_keys

    cfg = load_config(preset, [f"workdir={tmp_path}"])
    run = stages_for([], STAGES, cfg)
    assert [s.name for s in run] == [s.name for s in BEFORE_ALIGN]
    assert [s.inputs for s in run] == [s.inputs for s in BEFORE_ALIGN]
    assert stage_keys(cfg, STAGES) == stage_keys(cfg, BEFORE_ALIGN)
    # An unset step's settings are nobody's input; an explicit null is the same config.
    assert stage_keys(load_config(preset, [f"workdir={tmp_path}", "align.dpo.beta=0.5", "align.lr=1"]), STAGES) == \
        stage_keys(load_config(preset, [f"workdir={tmp_path}", "align.task=null"]), STAGES) == stage_keys(cfg, STAGES)


def test_align_runs_after_finetune_from_its_output_and_moves_only_what_follows(tmp_path):
    from lm.pipeline.workspace import stage_keys

    plain = stage_keys(load_config("tiny", [f"workdir={tmp_path}"]), STAGES)
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    chain = ["finetune.task=sft", "align.task=dpo", f"align.data={tmp_path / 'prefs.jsonl'}"]
    cfg = load_config("tiny", [f"workdir={tmp_path}", *chain])
    run = {s.name: s for s in stages_for([], STAGES, cfg)}
    assert list(run) == ["ingest", "clean", "base_model", "tokenize", "finetune_data", "pretrain", "finetune",
                         "align_data", "align", "evaluate", "export", "deploy"]
    assert run["align"].inputs == ("finetune", "align_data", "tokenize")
    assert {"align", "align_data"} <= set(run["evaluate"].inputs) & set(run["export"].inputs)
    keys = stage_keys(cfg, STAGES)
    sft = stage_keys(load_config("tiny", [f"workdir={tmp_path}", "finetune.task=sft"]), STAGES)
    assert {n for n in sft if keys[n] != sft[n]} == {"evaluate", "export", "deploy"}
    assert {n for n in plain if plain[n] != keys[n]} == {"finetune_data", "finetune", "evaluate", "export", "deploy"}

    def moved(*overrides):
        other = stage_keys(load_config("tiny", [f"workdir={tmp_path}", *chain, *overrides]), STAGES)
        return {n for n in keys if keys[n] != other[n]}

    after = {"align", "evaluate", "export", "deploy"}
    assert moved("align.dpo.beta=0.3") == moved("align.lr=0.01") == moved("align.resume=never") | after == after
    assert moved("align.dpo.chosen_column=good") == {"align_data"} | after
    assert moved("finetune.lr=0.1") == {"finetune"} | after


def test_a_step_the_config_leaves_out_is_refused_by_name(tmp_path, capsys):
    from lm.errors import ConfigError

    with pytest.raises(ConfigError, match="stage align runs only when align.task is set"):
        stages_for(["align"], STAGES, load_config("tiny"))
    assert main(["align-data", f"workdir={tmp_path}"]) == 2
    assert "stage align_data runs only when align.task is set: set align.task=..." in capsys.readouterr().err
    assert commands(STAGES)["align"][0] == ["align"] and commands(STAGES)["align-data"][0] == ["align_data"]
