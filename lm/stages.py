"""THE stage table: what the pipeline's stages are, in the order they run.

Each row names a stage once: the ``lm/`` function that does its work, the stages it reads, the
config keys and files its result depends on, the code it runs, and the files it leaves. From this
table alone come the output folders and cache keys (``lm.pipeline.workspace``), the MLflow child runs and
their params, the Prefect wiring (``flows/pipeline.py``), the CLI subcommands (``flows/cli.py``)
and the checks made before a run starts (:func:`preflight`). Adding a stage is one row here and,
if its work is new, one function in ``lm/``.

This module is plain data and knows nothing of Prefect or MLflow.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from lm.config import Config
from lm.errors import ConfigError, LmforgeError
from lm.finetune import DATA, data_builder
from lm.pipeline.stage import Stage, StageContext, StageResult, needed, wanted

# ---- what each stage runs: its lm/ function, given the stage's inputs ---------------------------


def _ingest(ctx: StageContext) -> StageResult:
    from lm.data.ingest import ingest

    # A retrain reads only new and changed files: the rest comes from the last ingest of this
    # pipeline made with the same settings (any data.sources, any files).
    with _extending(ctx, "ingest", varying=("data.sources", "data.stdlib_tests")) as earlier:
        return ingest(ctx.cfg.data, out_dir=ctx.out_dir, previous=earlier)


def _clean(ctx: StageContext) -> StageResult:
    from lm.data.clean import clean, clean_part
    from lm.data.ingest import DOCUMENTS

    on_cluster = ctx.cluster_map
    map_parts = None if on_cluster is None else (lambda parts, cfg: on_cluster(clean_part, parts, cfg))
    with _extending(ctx, "clean") as earlier:  # the same filters, dedup, seed and split: new documents only
        return clean(ctx.cfg.data, ctx.inputs["ingest"] / DOCUMENTS, out_dir=ctx.out_dir,
                     map_parts=map_parts, previous=earlier)


@contextmanager
def _extending(ctx: StageContext, name: str, varying: tuple[str, ...] = ()):
    """The earlier output of stage ``name`` this run may extend (None: there is none); the stage's
    output is marked with its lineage for the next run."""
    from lm.pipeline import workspace

    stage = next(s for s in STAGES if s.name == name)
    ident = workspace.lineage(ctx.cfg, stage, varying)
    earlier = workspace.earlier_output(ctx.cfg, stage, ident, ctx.out_dir)
    yield earlier
    workspace.write_lineage(ctx.out_dir, ident, earlier)


def _base_model(ctx: StageContext) -> StageResult:
    from lm.pipeline.base_model import prepare_base

    return prepare_base(ctx.cfg, out_dir=ctx.out_dir)


def _base_model_key(cfg: Config):
    from lm.pipeline.base_model import fingerprint

    return fingerprint(cfg)


def _tokenize(ctx: StageContext) -> StageResult:
    from lm.text.tokenize_stage import tokenize

    # A retrain that keeps the tokenizer (warm start from the champion) encodes only new documents: the
    # rest is copied from the last tokenize of this pipeline made with that tokenizer (checked inside).
    with _extending(ctx, "tokenize", varying=("tokenizer",)) as earlier:
        return tokenize(ctx.cfg, ctx.inputs["clean"], out_dir=ctx.out_dir, base_dir=ctx.inputs["base_model"],
                        previous=earlier)


def _finetune_data(ctx: StageContext) -> StageResult:
    return data_builder(ctx.cfg.finetune.task)(ctx.cfg, out_dir=ctx.out_dir)


def _pretrain(ctx: StageContext) -> StageResult:
    from lm.models.source import read_source
    from lm.pipeline.base_model import use_as_pretrained
    from lm.training.launch import launch

    base = ctx.inputs["base_model"]
    if read_source(base) is None:
        return launch("pretrain", ctx, ["--data", str(ctx.inputs["tokenize"])])
    if not ctx.cfg.pretrain.enabled:
        return use_as_pretrained(base, ctx.inputs["tokenize"], ctx.out_dir)
    return launch("pretrain", ctx, ["--data", str(ctx.inputs["tokenize"]), "--init", str(base)])


def _finetune(ctx: StageContext) -> StageResult:
    from lm.training.launch import launch

    i = ctx.inputs
    return launch("finetune", ctx, ["--data", str(i["finetune_data"]), "--tokens", str(i["tokenize"]),
                                    "--init", str(i["pretrain"])])


@contextmanager
def _align_keys():
    """The align step runs a method on ``cfg.aligned()``, where its block reads as ``finetune``: what
    it says of a key names the key the user set."""
    try:
        yield
    except LmforgeError as e:
        e.args = (re.sub(r"\bfinetune\.", "align.", str(e.args[0])), *e.args[1:]) if e.args else e.args
        raise


def _align_data(ctx: StageContext) -> StageResult:
    with _align_keys():
        return data_builder(ctx.cfg.align.task)(ctx.cfg.aligned(), out_dir=ctx.out_dir)


def _align(ctx: StageContext) -> StageResult:
    from lm.fileio import file_sha256
    from lm.training.launch import launch

    i = ctx.inputs
    with _align_keys():  # from the first step's weights: its model is also DPO's reference
        result = launch("finetune", replace(ctx, cfg=ctx.cfg.aligned()),
                        ["--data", str(i["align_data"]), "--tokens", str(i["tokenize"]), "--init", str(i["finetune"])])
    result.params["init_weights_sha256"] = file_sha256(i["finetune"] / "model.safetensors")  # = finetune's weights_sha256
    return result


def _last_step(ctx: StageContext) -> tuple[Config, str, str]:
    """The last fine-tuning step: the config its method reads, its stage (whose data is ``<stage>_data``),
    and the stage whose model it started from (its method's baseline, and the language model that is
    evaluated and exported beside it)."""
    if ctx.cfg.align.task is not None:
        return ctx.cfg.aligned(), "align", "finetune"
    return ctx.cfg, "finetune", "pretrain"


def _evaluate(ctx: StageContext) -> StageResult:
    from lm.pipeline.evaluate import evaluate

    i = ctx.inputs
    cfg, step, start = _last_step(ctx)
    return evaluate(cfg, i[start], i[step], i["tokenize"], i[f"{step}_data"], out_dir=ctx.out_dir)


def _export(ctx: StageContext) -> StageResult:
    from lm.pipeline.export import export

    i = ctx.inputs
    cfg, step, start = _last_step(ctx)
    metrics = json.loads((i["evaluate"] / "metrics.json").read_text())
    return export(cfg.finetune.task, i[step], i[start], i["tokenize"], i[f"{step}_data"], out_dir=ctx.out_dir,
                  metrics=metrics, run_id=ctx.run_id)


def _deploy(ctx: StageContext) -> StageResult:
    from lm.pipeline.evaluate import EVAL_SETS, digest_for_metric, rescore
    from lm.tracking.registry import deploy

    i = ctx.inputs
    cfg, step, _ = _last_step(ctx)
    metrics = json.loads((i["evaluate"] / "metrics.json").read_text())
    export_dir = i["export"]
    eval_set = digest_for_metric(cfg, json.loads((i["evaluate"] / EVAL_SETS).read_text()))

    def rescore_here(model_dir: Path, scratch: Path) -> dict[str, float]:  # the champion, on this run's data
        return rescore(cfg, model_dir, i[f"{step}_data"], i["tokenize"], out_dir=scratch)

    return deploy(cfg.deploy, cfg.tracking_uri(), ctx.run_id, export_dir, export_dir.name, metrics,
                  eval_set=eval_set, rescore=rescore_here, out_dir=ctx.out_dir)


def _check_promote_metric(cfg: Config) -> None:
    from lm.pipeline.evaluate import metric_directions

    task = f"finetune.task={cfg.finetune.task}"
    if cfg.align.task is not None:  # the model deployed is the last step's
        cfg, task = cfg.aligned(), f"align.task={cfg.align.task}"
    known = metric_directions(cfg)
    metric, mode = cfg.deploy.promote_metric, cfg.deploy.promote_mode
    if metric not in known:
        raise ConfigError(
            f"deploy.promote_metric={metric!r} is not a metric the evaluate stage reports for model.kind="
            f"{cfg.model.kind} and {task}; choose one of {', '.join(known)}"
        )
    if known[metric] != mode:
        raise ConfigError(
            f"deploy.promote_mode={mode!r}, but {metric} is better when {'higher' if known[metric] == 'max' else 'lower'}: "
            f"set deploy.promote_mode={known[metric]}"
        )


# ---- the table ------------------------------------------------------------------------------------


def _method_data_keys(block: str) -> tuple[str, ...]:
    """The keys of a fine-tuning block (``finetune`` or ``align``) its method's data depends on."""
    return tuple(f"{block}.{key}" for key in (
        "data", "val_fraction", "test_fraction", "classify.text_column", "classify.label_column",
        "classify.num_classes", "sft.prompt_column", "sft.response_column", "sft.messages_column",
        "sft.system_prompt", "sft.format", "dpo.prompt_column", "dpo.chosen_column", "dpo.rejected_column",
        "dpo.system_prompt", "seed"))


_DATA_CODE = tuple(sorted({d.partition(":")[0] for d in DATA.values()}))  # the data builders' modules only

STAGES: tuple[Stage, ...] = (
    Stage("ingest", _ingest, "read every configured source into documents/ (parquet parts), with provenance",
          config=("data.sources", "data.text_field", "data.max_bad_fraction", "data.max_invalid_utf8_fraction",
                  "data.max_docs", "data.stdlib_tests", "data.row_group_mb", "data.max_doc_chars"),
          files=("data.sources",), code=("lm.data.ingest",),
          outputs=("documents", "provenance.csv"), group="data"),
    Stage("clean", _clean, "filter, deduplicate (exact + MinHash) and split the documents into train/val",
          inputs=("ingest",), config=("data.clean", "data.dedup", "data.val_fraction", "data.seed"),
          code=("lm.data.clean",), outputs=("train.parquet", "val.parquet"), group="data"),
    Stage("base_model", _base_model, "bring the model to start from (model.init_from) into lmforge's format",
          config=("model.init_from", "model.init_from_fallback", "model.kind"), fingerprint=_base_model_key,
          code=("lm.pipeline.base_model",),
          outputs=("source.json",)),
    Stage("tokenize", _tokenize, "build the tokenizer (or take the base model's) and write token shards",
          inputs=("clean", "base_model"), config=("tokenizer",), files=("tokenizer.path",), code=("lm.text.tokenize_stage",),
          outputs=("tokenizer.json", "index.json"), group="data"),
    Stage("finetune_data", _finetune_data, "build the fine-tuning data (train/val/test splits)",
          config=("finetune.task", *_method_data_keys("finetune"), "evaluate.data"),
          files=("finetune.data", "evaluate.data"), code=_DATA_CODE, group="data"),
    Stage("pretrain", _pretrain, "pretrain the language model on the token shards",
          inputs=("tokenize", "base_model"), config=("model", "pretrain", "trainer"),
          code=("lm.training.child", "lm.pipeline.base_model"), outputs=("model.safetensors", "model.json", "result.json"),
          resumable=True, live_metrics=True),
    Stage("finetune", _finetune, "fine-tune the pretrained model with the method finetune.task",
          inputs=("pretrain", "finetune_data", "tokenize"), config=("finetune", "trainer"),
          code=("lm.training.child", "lm.finetune"), outputs=("model.safetensors", "model.json", "result.json"),
          resumable=True, live_metrics=True),
    # A second fine-tuning step (align.task: preference tuning after instruction tuning), from the
    # first's weights; left out of a run whose config does not set it.
    Stage("align_data", _align_data, "build the second fine-tuning step's data (align.task; train/val/test splits)",
          config=("align.task", *_method_data_keys("align"), "evaluate.data"),
          files=("align.data", "evaluate.data"), code=_DATA_CODE, group="data", when="align.task"),
    Stage("align", _align, "fine-tune the fine-tuned model further with the method align.task",
          inputs=("finetune", "align_data", "tokenize"), config=("align", "trainer"),
          code=("lm.training.child", "lm.finetune"), outputs=("model.safetensors", "model.json", "result.json"),
          resumable=True, live_metrics=True, when="align.task"),
    # The stages below take the last fine-tuning step's model (align's, when it runs).
    Stage("evaluate", _evaluate, "evaluate the language model and the fine-tuned model beside baselines",
          inputs=("pretrain", "finetune", "tokenize", "finetune_data", "align", "align_data"), config=("evaluate",),
          code=("lm.pipeline.evaluate", "lm.finetune"), outputs=("metrics.json", "eval_sets.json")),
    Stage("export", _export, "write the self-contained model folder: safetensors, config, tokenizer",
          inputs=("finetune", "pretrain", "tokenize", "finetune_data", "evaluate", "align", "align_data"),
          code=("lm.pipeline.export", "lm.finetune"), outputs=("model.safetensors", "model.json", "tokenizer.json")),
    Stage("deploy", _deploy, "register the export in MLflow; promote it if it beats the champion on the same data",
          inputs=("export", "evaluate", "finetune_data", "tokenize", "align_data"), config=("deploy",),
          code=("lm.tracking.registry", "lm.pipeline.evaluate"), cached=False,
          check=_check_promote_metric),
)


def groups(table: Sequence[Stage]) -> dict[str, list[str]]:
    """CLI group commands: group name -> its stages."""
    out: dict[str, list[str]] = {}
    for stage in table:
        if stage.group:
            out.setdefault(stage.group, []).append(stage.name)
    return out


def preflight(cfg: Config, stages: Sequence[Stage]) -> None:
    """What can be checked before the first of ``stages`` starts: fail in seconds, not after training.
    The files each stage's config names exist (the first file of each source; the full walk is the
    cache key's), the work folder can be made, and each stage's own check holds."""
    from lm.data import sources

    for stage in stages:
        for key in stage.files:
            value = cfg.value(key)
            for spec in sources.file_specs(value):
                if spec is not None and spec != sources.STDLIB and not spec.startswith(sources.HF_PREFIX):
                    next(sources.resolve(spec, key))
        if stage.check is not None:
            stage.check(cfg)
        if stage.fingerprint is not None:  # what it names exists (a folder, a registered version)
            stage.fingerprint(cfg)
    workdir = Path(cfg.workdir).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir={cfg.workdir!r} is a file, not a folder: point workdir at a folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir={cfg.workdir!r} cannot be created: {e.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise ConfigError(f"workdir={cfg.workdir!r} is not writable")


def stages_for(targets: Sequence[str], table: Sequence[Stage] = STAGES, cfg: Config | None = None) -> list[Stage]:
    """The stages a run of ``targets`` (stage names, a group name, or none for all) needs; given
    ``cfg``, without those it leaves out (:attr:`Stage.when`)."""
    if cfg is not None:
        table, every = wanted(table, cfg), table
        kept = {s.name for s in table}
        for stage in every:
            if stage.name in targets and stage.name not in kept:
                raise ConfigError(f"stage {stage.name} runs only when {stage.when} is set: set {stage.when}=...")
    if not targets:
        return list(table)
    names: list[str] = []
    for t in targets:
        names += groups(table).get(t, [t])
    return needed(table, names)
