"""Two fine-tuning steps in one run (``align``): instruction tuning, then preference tuning from its
weights, each its own stage, child run and cache key; what a bad align input says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm.config import load_config
from lm.errors import DataError
from lm.pipeline.stage import StageContext, execute, stage_by_name
from lm.stages import STAGES


def write_pairs(path: Path, n: int) -> Path:
    """The toy preference of tests/test_dpo.py: a polite reply over a rude one."""
    rows = [{"prompt": f"Give me the number {i}.", "chosen": f"Here it is: {i}. Thank you!", "rejected": f"No. {i} go away"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_bad_align_file_is_named_with_the_align_keys_to_set(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "good": "a", "bad": "b"}) + "\n")
    cfg = load_config("tiny", [f"workdir={tmp_path}", "finetune.task=sft", "align.task=dpo", f"align.data={bad}"])
    with pytest.raises(DataError) as e:
        execute(stage_by_name(STAGES, "align_data"), StageContext(cfg, {}, tmp_path / "align_data"))
    assert str(bad) in str(e.value) and "align.dpo.chosen_column" in str(e.value) and "finetune." not in str(e.value)


@pytest.mark.slow  # 4 to 7 min: two tiny pipelines through Prefect and MLflow
def test_the_pipeline_runs_sft_then_dpo_from_its_weights_and_registers_the_result(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    from flows.pipeline import pipeline
    from lm.finetune.dpo import REFERENCE, reference_key
    from lm.models.folder import load_model
    from lm.text.chat import ChatFormat
    from lm.tracking.runs import run_tree

    data = write_pairs(tmp_path / "pairs.jsonl", 300)
    common = [f"workdir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
              "finetune.task=sft", "finetune.max_steps=20", "align.task=dpo", f"align.data={data}",
              "align.max_steps=30", "align.batch_size=16", "align.lr=3e-3", "align.warmup_steps=5",
              "align.val_every=10", "align.ckpt_every=10", "deploy.promote_metric=eval/rewards/accuracy",
              "deploy.model_name=lmforge-tiny-chain"]
    first = pipeline(config=load_config("tiny", common))
    tree = run_tree(first["tracking_uri"], first["mlflow_run_id"])
    assert tree["parent"].info.status == "FINISHED"
    sft, dpo = tree["children"]["finetune"], tree["children"]["align"]
    assert {"finetune_data", "finetune", "align_data", "align", "evaluate", "export", "deploy"} <= set(tree["children"])
    assert sft.data.params["finetune.task"] == "sft" and dpo.data.params["align.task"] == "dpo"
    assert "train/loss" in sft.data.metrics and "train/rewards/accuracy" in dpo.data.metrics
    # The second step started from the first's weights: the file it read, and the network its
    # reference log-probabilities were computed by (the key hashes the starting weights).
    assert dpo.data.params["init_weights_sha256"] == sft.data.params["weights_sha256"]
    align_dir, sft_dir = Path(first["align"]), Path(first["finetune"])
    with safe_open(str(align_dir / REFERENCE), framework="pt") as f:
        stored = f.metadata()["key"]
    fmt, seq_len = ChatFormat.load(first["tokenize"]), load_model(sft_dir).args.seq_len
    assert stored == reference_key(load_model(sft_dir), fmt, Path(first["align_data"]), seq_len)
    assert stored != reference_key(load_model(first["pretrain"]), fmt, Path(first["align_data"]), seq_len)
    # Evaluated, exported and registered: the last step's model, by the last step's method.
    evaluated = tree["children"]["evaluate"].data.metrics
    assert evaluated["eval/base_rewards/accuracy"] == 0.5 and evaluated["eval/rewards/accuracy"] >= 0.9
    assert json.loads((Path(first["export"]) / "model.json").read_text())["task"] == "dpo"
    client = MlflowClient(first["tracking_uri"])
    assert len(client.search_model_versions("name='lmforge-tiny-chain'")) == 1

    # Another align setting: align and what follows run again, finetune is reused.
    second = pipeline(config=load_config("tiny", [*common, "align.dpo.beta=0.3"]))
    tree = run_tree(second["tracking_uri"], second["mlflow_run_id"])
    assert second["finetune"] == first["finetune"] and second["align"] != first["align"]
    assert tree["children"]["finetune"].data.tags["lmforge.cached"] == "true"
    assert tree["children"]["align"].data.tags["lmforge.cached"] == "false"
    assert tree["children"]["align"].data.params["init_weights_sha256"] == sft.data.params["weights_sha256"]
    assert len(client.search_model_versions("name='lmforge-tiny-chain'")) == 2
