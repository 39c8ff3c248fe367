"""Model selection (model.init_from): a Hugging Face folder or an lmforge folder becomes the base
model, with its tokenizer; pretraining is skipped or continued; fine-tuning starts from it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from train_fixtures import make_finetune_dir, stdlib_texts, tiny_config_yaml

from lm.config import load_config
from lm.errors import ConfigError
from lm.models.folder import load_model
from lm.models.source import read_source
from lm.pipeline.base_model import prepare_base, use_as_pretrained
from lm.text.shards import TokenIndex
from lm.text.tokenize_stage import tokenize
from lm.text.tokenizer import byte_tokenizer, load_tokenizer
from lm.training.child import run_finetune

transformers = pytest.importorskip("transformers")


def _hf_llama(folder, vocab_extra: int = 0):
    """A tiny random Llama, saved as save_pretrained writes it, with a byte-level tokenizer."""
    tok = byte_tokenizer(["</s>", "<unk>"])
    vocab = tok.get_vocab_size(with_added_tokens=True) + vocab_extra
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=tok.token_to_id("</s>"),
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return model, tok


def _clean_dir(root):
    root.mkdir(parents=True)
    texts = stdlib_texts()
    pd.DataFrame({"text": texts[1:]}).to_parquet(root / "train.parquet")
    pd.DataFrame({"text": texts[:1]}).to_parquet(root / "val.parquet")
    return root


def test_a_hugging_face_llama_becomes_the_pretrained_model_with_its_tokenizer(tmp_path):
    hf, hf_tok = _hf_llama(tmp_path / "hf")
    cfg = load_config(tiny_config_yaml(tmp_path / "c.yaml", model={"init_from": str(tmp_path / "hf")}))
    (base := tmp_path / "base").mkdir()
    prepare_base(cfg, out_dir=base)
    source = read_source(base)
    assert source["kind"] == "hf" and source["tokenizer"] and source["special_tokens"][0] == "</s>"

    (tokens := tmp_path / "tokens").mkdir()
    tokenize(cfg, _clean_dir(tmp_path / "clean"), out_dir=tokens, base_dir=base)
    index = TokenIndex.load(tokens)
    assert index.kind == "base_model" and index.eot_id == hf_tok.token_to_id("</s>")
    # The shards hold the base tokenizer's ids, not a newly learned vocabulary.
    assert load_tokenizer(tokens / "tokenizer.json").to_str() == hf_tok.to_str()

    (pre := tmp_path / "pre").mkdir()
    result = use_as_pretrained(base, tokens, pre)
    assert json.loads((pre / "result.json").read_text())["skipped"] is True
    assert result.params["weights_sha256"]
    ours = load_model(pre)
    idx = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-4)

    # Fine-tuning starts from it: a classifier on the imported decoder trains.
    ft_cfg = load_config(
        tiny_config_yaml(tmp_path / "f.yaml", model={"init_from": str(tmp_path / "hf")}, finetune={"max_steps": 4})
    )
    metrics = run_finetune(ft_cfg, make_finetune_dir(tmp_path / "ft"), tokens, pre, tmp_path / "out")
    assert metrics["val/accuracy"] >= 0
    assert load_model(tmp_path / "out").backbone.args.d_model == 64
    # It was tuned from the imported weights: a few small steps away from them, not from a fresh start.
    tuned = load_model(tmp_path / "out").backbone.embed_tokens.weight
    start = hf.model.embed_tokens.weight
    assert 0 < float((tuned - start).norm()) < 0.1 * float(start.norm())


def test_an_lmforge_classifier_folder_gives_its_backbone(tmp_path):
    from lm.models.folder import save_model
    from lm.models.transformer import Decoder, ModelArgs, SequenceClassifier

    args = ModelArgs(vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, d_model=32, d_ff=64, seq_len=32)
    clf = SequenceClassifier(Decoder(args), 3)
    save_model(clf, tmp_path / "clf", extra={"task": "classify", "eot_id": 256, "pad_id": 257, "mask_id": 258})
    cfg = load_config(tiny_config_yaml(tmp_path / "c.yaml", model={"init_from": str(tmp_path / "clf")}))
    (tmp_path / "base").mkdir()
    prepare_base(cfg, out_dir=tmp_path / "base")
    source = read_source(tmp_path / "base")
    assert source["kind"] == "lmforge" and source["tokenizer"] is False and source["vocab_size"] == 300
    base = load_model(tmp_path / "base")
    assert torch.equal(base.embed_tokens.weight, clf.backbone.embed_tokens.weight)


def test_wrong_starting_points_are_named(tmp_path):
    hf, _ = _hf_llama(tmp_path / "hf")
    cfg = load_config(tiny_config_yaml(tmp_path / "c.yaml", model={"kind": "encoder", "init_from": str(tmp_path / "hf")}))
    with pytest.raises(ConfigError, match="is a decoder, but model.kind=encoder"):
        prepare_base(cfg, out_dir=tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    cfg = load_config(tiny_config_yaml(tmp_path / "c2.yaml", model={"init_from": str(tmp_path / "junk")}))
    with pytest.raises(ConfigError, match="neither a Hugging Face model folder.*notes.txt"):
        prepare_base(cfg, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="pretrain.enabled=false leaves nothing to fine-tune"):
        load_config("tiny", ["pretrain.enabled=false"])
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        prepare_base(load_config("tiny", ["model.init_from=models:/x@"]), out_dir=tmp_path)


def test_a_hugging_face_bert_becomes_the_encoder_a_classifier_is_tuned_on(tmp_path):
    tok = byte_tokenizer(["[SEP]", "[PAD]", "[MASK]", "[CLS]"])
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
    )
    hf_bert = transformers.BertForMaskedLM(hf_cfg)
    hf_bert.save_pretrained(tmp_path / "bert")
    tok.save(str(tmp_path / "bert" / "tokenizer.json"))
    (tmp_path / "bert" / "tokenizer_config.json").write_text(
        json.dumps({"sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]", "cls_token": "[CLS]"})
    )
    cfg = load_config(tiny_config_yaml(
        tmp_path / "c.yaml", model={"kind": "encoder", "init_from": str(tmp_path / "bert")}, finetune={"max_steps": 4}
    ))
    (base := tmp_path / "base").mkdir()
    prepare_base(cfg, out_dir=base)
    source = read_source(base)
    assert source["arch"] == "bert" and source["special_tokens"] == ["[SEP]", "[PAD]", "[MASK]"]
    (tokens := tmp_path / "tokens").mkdir()
    tokenize(cfg, _clean_dir(tmp_path / "clean"), out_dir=tokens, base_dir=base)
    assert TokenIndex.load(tokens).mask_id == tok.token_to_id("[MASK]")
    (pre := tmp_path / "pre").mkdir()
    use_as_pretrained(base, tokens, pre)
    metrics = run_finetune(cfg, make_finetune_dir(tmp_path / "ft"), tokens, pre, tmp_path / "out")
    assert metrics["val/accuracy"] >= 0
    assert load_model(tmp_path / "out").backbone.args.arch == "bert"
    tuned = load_model(tmp_path / "out").backbone.embed_tokens.weight
    start = hf_bert.bert.embeddings.word_embeddings.weight
    assert 0 < float((tuned - start).norm()) < 0.1 * float(start.norm())


def test_instruction_tuning_starts_from_a_hugging_face_llama_with_its_own_tokenizer(tmp_path):
    """The imported tokenizer has no ChatML tokens: the plain-text chat template is stored with it,
    sft trains on the imported weights, and the export's hf/ folder is the tuned Llama again."""
    from lm.data.instruct import build_instruct_data
    from lm.finetune import sft
    from lm.pipeline.export import export

    _hf_llama(tmp_path / "hf")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(80)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(tiny_config_yaml(
        tmp_path / "c.yaml", model={"init_from": str(tmp_path / "hf")},
        finetune={"task": "sft", "data": str(tmp_path / "qa.jsonl"), "max_steps": 4, "val_every": 2},
    ))
    for name in ("base", "tokens", "pre", "data", "export"):
        (tmp_path / name).mkdir()
    prepare_base(cfg, out_dir=tmp_path / "base")
    tokenize(cfg, _clean_dir(tmp_path / "clean"), out_dir=tmp_path / "tokens", base_dir=tmp_path / "base")
    template = json.loads((tmp_path / "tokens" / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" not in template  # the tokenizer cannot encode ChatML's tokens: plain text
    use_as_pretrained(tmp_path / "base", tmp_path / "tokens", tmp_path / "pre")
    build_instruct_data(cfg, out_dir=tmp_path / "data")
    metrics = run_finetune(cfg, tmp_path / "data", tmp_path / "tokens", tmp_path / "pre", tmp_path / "ft")
    assert metrics["steps"] == 4
    export("sft", tmp_path / "ft", tmp_path / "pre", tmp_path / "tokens", tmp_path / "data", out_dir=tmp_path / "export")
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "hf").eval()
    ours = load_model(tmp_path / "ft")
    idx = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        assert torch.allclose(tuned(idx).logits, ours(idx)[0], atol=1e-4)
    answer = sft.Predictor(tmp_path / "export").predict(pd.DataFrame({"prompt": ["What is 3 plus 3?"]}), {"max_new_tokens": 4})
    assert answer["completion_tokens"][0] >= 1
