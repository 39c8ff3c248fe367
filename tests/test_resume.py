"""Resume after a crash: SIGKILL mid-run (pretraining, fine-tuning), rerun, get the uninterrupted result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import (
    finetune_args,
    kill_at_checkpoint,
    make_finetune_dir,
    make_token_dir,
    pretrain_args,
    run_training,
    tiny_config_yaml,
)


def final_metrics(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())["metrics"]


@pytest.mark.slow  # ~20 s: three training processes
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    tokens = make_token_dir(tmp_path / "tokens")
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        pretrain={
            "max_steps": 40,
            "ckpt_every": 4,
            "keep_last": 2,
            "val_every": 10,
            "resume": "auto",
            "tokens_per_step": 256,  # 2 micro-batches per step: the data position must count both
        },
    )
    run_training(pretrain_args(cfg, tokens, tmp_path / "ref"))
    expected = final_metrics(tmp_path / "ref")

    out = tmp_path / "crashed"
    kill_at_checkpoint(pretrain_args(cfg, tokens, out), 16)
    assert not (out / "result.json").exists()
    ckpts = sorted((out / "checkpoints").glob("step-*.ckpt"))
    assert len(ckpts) >= 2
    # The newest checkpoint is damaged as a torn copy would be: the previous valid one must be used.
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resumed = run_training(pretrain_args(cfg, tokens, out))
    assert f"{newest} (step" in resumed.stdout and "truncated or corrupt" in resumed.stdout
    assert f"resuming from {ckpts[-2]}" in resumed.stdout
    assert "not resumable" not in resumed.stderr  # the loader's position is in the checkpoint
    got = final_metrics(out)
    assert got["steps"] == expected["steps"] == 40
    assert got["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-5)
    assert got["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-5)


def assert_a_kill_at_step_20_resumes_to_the_uninterrupted_result(cfg, ft, tokens, start: Path, tmp_path: Path) -> None:
    """A 36-step fine-tune from ``start``, killed at its step-20 checkpoint and resumed, ends as the
    same run left alone: same steps, same final loss, same validation accuracy."""
    run_training(finetune_args(cfg, ft, tokens, start, tmp_path / "ref"))
    expected = final_metrics(tmp_path / "ref")
    kill_at_checkpoint(finetune_args(cfg, ft, tokens, start, tmp_path / "crashed"), 20)
    resumed = run_training(finetune_args(cfg, ft, tokens, start, tmp_path / "crashed"))
    assert "resuming from" in resumed.stdout and "not resumable" not in resumed.stderr
    got = final_metrics(tmp_path / "crashed")
    assert got["steps"] == expected["steps"] == 36
    assert got["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-6)
    assert got["val/accuracy"] == expected["val/accuracy"]


@pytest.mark.slow  # ~20 s: four training processes
def test_finetuning_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    tokens = make_token_dir(tmp_path / "tokens")
    ft = make_finetune_dir(tmp_path / "ft")
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        pretrain={"max_steps": 8},
        finetune={"max_steps": 36, "ckpt_every": 4, "val_every": 12},
    )
    run_training(pretrain_args(cfg, tokens, tmp_path / "pre"))
    # 128 examples in batches of 8: 16 steps an epoch, so step 20 is mid-way through the second.
    assert_a_kill_at_step_20_resumes_to_the_uninterrupted_result(cfg, ft, tokens, tmp_path / "pre", tmp_path)


@pytest.mark.slow  # ~25 s a family: three training processes
@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_an_imported_family_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, family):
    """Resume does not depend on the family: GPT-2 (learned positions, LayerNorm, Conv1D weights) and
    Phi-3 (fused projections) fine-tune, are killed, and resume to the uninterrupted result."""
    import shutil

    import torch
    import transformers

    from lm.models.hf import import_hf
    from lm.text.shards import TokenIndex

    tokens = make_token_dir(tmp_path / "tokens")
    ft = make_finetune_dir(tmp_path / "ft")
    vocab = TokenIndex.load(tokens).vocab_size
    torch.manual_seed(0)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None))
    else:
        hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
            eos_token_id=None))
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(tokens / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    import_hf(tmp_path / "hf", tmp_path / "pre", max_seq_len=32)
    cfg = tiny_config_yaml(tmp_path / "cfg.yaml", finetune={"max_steps": 36, "ckpt_every": 4, "val_every": 12})
    assert_a_kill_at_step_20_resumes_to_the_uninterrupted_result(cfg, ft, tokens, tmp_path / "pre", tmp_path)
