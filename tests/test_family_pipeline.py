"""The whole pipeline from a model of another family (model.init_from = a save_pretrained folder):
a Qwen2-shaped decoder instruction-tuned with LoRA, and a RoBERTa-shaped encoder tuned as a
classifier, each to a registered champion; the decoder's export is a Qwen2 folder with its adapter,
and ``lmforge serve`` answers the openai client with the champion, stopping at Qwen's <|im_end|>."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from serve_fixtures import client, serving
from test_family_chat import QWEN25

from lm.config import load_config
from lm.text.tokenizer import byte_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROBERTA_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _qwen2_folder(folder: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=258, pad_token_id=256,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    byte_tokenizer(QWEN_TOKENS).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN25}
    ))


def _roberta_folder(folder: Path) -> None:
    torch.manual_seed(0)
    tok = byte_tokenizer(ROBERTA_TOKENS)  # <pad> is id 257
    config = transformers.RobertaConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=258 + 128, pad_token_id=257,
        bos_token_id=256, eos_token_id=258,
    )
    transformers.RobertaForMaskedLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "pad_token": "<pad>", "mask_token": "<mask>",
         "cls_token": "<s>", "unk_token": "<unk>"}
    ))


def _run(tmp: Path, name: str, overrides: list[str]) -> dict:
    from flows.pipeline import pipeline

    cfg = load_config("tiny", [f"workdir={tmp / 'runs'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                               f"deploy.model_name={name}", *overrides])
    return pipeline(config=cfg)


@pytest.fixture(scope="module")
def qwen_run(prefect_harness, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("qwen2-pipeline")
    _qwen2_folder(tmp / "qwen2")
    return _run(tmp, "tiny-qwen2", [
        f"model.init_from={tmp / 'qwen2'}", "model.seq_len=256", "finetune.task=sft", "finetune.max_steps=8",
        "finetune.val_every=4", "finetune.lora.enabled=true",
        "finetune.sft.system_prompt=Be brief.", "evaluate.generate_prompts=4", "evaluate.max_new_tokens=8",
        "deploy.promote_metric=eval/chrf",
    ])


def test_an_imported_qwen2_is_tuned_with_lora_registered_and_exported_as_qwen2(qwen_run):
    export = Path(qwen_run["export"])
    config = json.loads((export / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    tuned = transformers.AutoModelForCausalLM.from_pretrained(export / "hf").eval()
    assert type(tuned).__name__ == "Qwen2ForCausalLM"
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    tok = json.loads((export / "hf" / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and tok["chat_template"] == QWEN25
    gen = json.loads((export / "hf" / "generation_config.json").read_text())
    assert 258 in gen["eos_token_id"]  # <|im_end|>

    import mlflow

    mlflow.set_tracking_uri(qwen_run["tracking_uri"])
    champion = mlflow.pyfunc.load_model("models:/tiny-qwen2@champion")
    answer = champion.predict(pd.DataFrame({"prompt": ["What does `json.loads(s)` do?"]}), params={"max_new_tokens": 4})
    assert answer["completion_tokens"][0] >= 1


def test_lmforge_serve_answers_the_openai_client_with_the_imported_champion(qwen_run):
    with serving("models:/tiny-qwen2@champion", tracking_uri=qwen_run["tracking_uri"]) as server:
        reply = client(server, key="unused").chat.completions.create(
            model="tiny-qwen2", messages=[{"role": "user", "content": "What does `json.loads(s)` do?"}],
            max_tokens=6, temperature=0,
        )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 6
    assert "<|im_end|>" not in choice.message.content


def test_an_imported_roberta_is_tuned_as_a_classifier_and_registered(prefect_harness, tmp_path_factory):
    import mlflow

    tmp = tmp_path_factory.mktemp("roberta-pipeline")
    _roberta_folder(tmp / "roberta")
    out = _run(tmp, "tiny-roberta", [
        f"model.init_from={tmp / 'roberta'}", "model.kind=encoder", "model.seq_len=128", "finetune.task=classify",
        "finetune.max_steps=8", "finetune.val_every=4",
    ])
    model = json.loads((Path(out["export"]) / "lm" / "model.json").read_text())
    assert model["args"]["family"] == "roberta" and model["args"]["position_offset"] == 258
    mlflow.set_tracking_uri(out["tracking_uri"])
    champion = mlflow.pyfunc.load_model("models:/tiny-roberta@champion")
    labels = champion.predict(pd.DataFrame({"text": ["Return the JSON encoding of obj.", "Split s like a shell."]}))
    assert len(labels) == 2
