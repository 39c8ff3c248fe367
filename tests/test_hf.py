"""Hugging Face interop: save_pretrained folders load into our networks with HF's logits, and our
decoder exports to a folder that transformers loads with our logits, tokens and chat template."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import close, randomise

from lm.errors import ConfigError
from lm.generation.sampling import SamplingParams, generate
from lm.models.bert import BertEncoder
from lm.models.folder import build_model, load_model, save_model
from lm.models.hf import export_hf, import_hf, is_hf_folder, load_hf
from lm.models.transformer import Decoder, Encoder, ModelArgs, SequenceClassifier
from lm.text.tokenizer import byte_tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
CHAT_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]  # ids 256..259
BERT_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]  # ids 256..259
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer_file(folder, specials: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    byte_tokenizer(specials).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def llama_folder(folder, tie: bool = False, vocab: int = VOCAB, dtype=torch.float32):
    """A tiny random LlamaForCausalLM (4 heads, 2 kv heads) and its tokenizer, as save_pretrained writes them."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=256 if vocab > 256 else None,
        pad_token_id=257 if vocab > 257 else None,
    )
    torch.manual_seed(0)
    hf = randomise(transformers.LlamaForCausalLM(cfg)).to(dtype)
    hf.save_pretrained(folder)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file(folder, CHAT_TOKENS)),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    tok.save_pretrained(folder)
    return hf


def bert_folder(folder, cls=None):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=256,
    )
    torch.manual_seed(0)
    hf = randomise((cls or transformers.BertForMaskedLM)(cfg))
    hf.save_pretrained(folder)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file(folder, BERT_TOKENS)),
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tok.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_folder_loads_and_imports_with_hf_logits(tmp_path, tie):
    hf = llama_folder(tmp_path / "hf", tie=tie)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits

    assert is_hf_folder(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert isinstance(ours, Decoder)
    assert (ours.args.n_kv_head, ours.args.tie_embeddings, ours.args.seq_len) == (2, tie, 64)
    with torch.no_grad():
        close(ours(idx)[0], want)

    info = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert info["architecture"] == "LlamaForCausalLM" and info["vocab_size"] == VOCAB
    assert (info["eos_token"], info["eos_token_id"], info["pad_token"], info["pad_token_id"]) == (
        "<|endoftext|>",
        256,
        "<|pad|>",
        257,
    )
    assert "bos_token" not in info
    loaded = load_model(tmp_path / "ours")
    with torch.no_grad():
        close(loaded(idx)[0], want)
    assert (loaded.meta["eot_id"], loaded.meta["pad_id"]) == (256, 257)
    assert load_tokenizer(tmp_path / "ours").encode("hi<|endoftext|>").ids == [104, 105, 256]
    assert (tmp_path / "ours" / "tokenizer_config.json").is_file()


def test_bf16_weights_load_as_float32_and_seq_len_can_be_capped(tmp_path):
    llama_folder(tmp_path / "hf", dtype=torch.bfloat16)
    ours = load_hf(tmp_path / "hf", max_seq_len=16)
    assert ours.embed_tokens.weight.dtype == torch.float32 and ours.args.seq_len == 16
    # HF computing in fp32 from the same bf16-rounded weights.
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(ours(idx)[0], hf(idx).logits)


def test_bert_folder_gives_hf_mlm_logits_with_padding(tmp_path):
    hf = bert_folder(tmp_path / "hf")
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    idx[1, 8:] = 256  # [PAD]
    with torch.no_grad():
        want = hf(idx, attention_mask=mask).logits
        ours = load_hf(tmp_path / "hf")
        assert isinstance(ours, BertEncoder) and ours.args.arch == "bert"
        close(ours(idx, attention_mask=mask)[0], want)
        close(ours(idx)[0], hf(idx).logits)

    info = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert info["architecture"] == "BertForMaskedLM" and info["random_init"] == []
    loaded = load_model(tmp_path / "ours")
    assert isinstance(loaded, BertEncoder)
    assert (loaded.meta["mask_id"], loaded.meta["pad_id"], loaded.meta["eot_id"]) == (259, 256, 258)
    with torch.no_grad():
        close(loaded(idx, attention_mask=mask)[0], want)


def test_bert_model_without_head_gives_hf_hidden_states(tmp_path):
    hf = bert_folder(tmp_path / "hf", cls=transformers.BertModel)
    idx = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(load_hf(tmp_path / "hf").hidden_states(idx), hf(idx).last_hidden_state)
    assert "lm_head.bias" in import_hf(tmp_path / "hf", tmp_path / "ours")["random_init"]


def bert_args(**kw) -> ModelArgs:
    base = dict(
        vocab_size=VOCAB,
        n_layer=2,
        n_head=4,
        n_kv_head=4,
        d_model=64,
        d_ff=128,
        seq_len=32,
        kind="encoder",
        arch="bert",
        ffn_act="gelu",
        norm_eps=1e-12,
    )
    return ModelArgs(**{**base, **kw})


def test_classifier_on_bert_learns_and_round_trips(tmp_path):
    torch.manual_seed(0)
    net = SequenceClassifier(build_model(bert_args()), num_classes=2)
    assert isinstance(net.backbone, BertEncoder)
    idx = torch.randint(0, 256, (8, 16))
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[::2, 10:] = 0
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, loss = net(idx, mask, labels)
        opt.zero_grad()
        loss.backward()
        assert net.backbone.embed_tokens.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

    net.eval()
    save_model(net, tmp_path / "clf", extra={"pad_id": 256})
    loaded = load_model(tmp_path / "clf")
    assert isinstance(loaded.backbone, BertEncoder)
    with torch.no_grad():
        close(loaded(idx, mask)[0], net(idx, mask)[0])


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_bert_encoder_save_load_round_trip(tmp_path, tie):
    torch.manual_seed(0)
    model = randomise(BertEncoder(bert_args(tie_embeddings=tie)))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    idx = torch.randint(0, VOCAB, (2, 12))
    targets = torch.full_like(idx, -100)
    targets[:, 3] = idx[:, 3]
    with torch.no_grad():
        (want, want_loss), (got, got_loss) = model(idx, targets), loaded(idx, targets)
    close(got, want)
    close(got_loss, want_loss)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_our_decoder_exports_to_a_folder_transformers_loads(tmp_path, tie):
    from safetensors import safe_open

    args = ModelArgs(
        vocab_size=VOCAB,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        d_ff=128,
        seq_len=64,
        tie_embeddings=tie,
        rope_theta=5000.0,
    )
    torch.manual_seed(0)
    ours = randomise(Decoder(args))
    out = tmp_path / "export"
    files = export_hf(
        ours,
        tokenizer_file(tmp_path / "tok", CHAT_TOKENS),
        out,
        chat_template=CHATML,
        special_tokens=dict(eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token=None),
        generation_config={"max_new_tokens": 8, "do_sample": False},
        card="# tiny\n\nA test model.\n",
    )
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert is_hf_folder(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(hf(idx).logits, ours(idx)[0])
        prompt = idx[:1, :6]
        got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    ours_gen = generate(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=8, temperature=0), eos_ids=(256,))[0]
    hf_ids = got[0].tolist()
    assert (hf_ids[:-1] if hf_ids[-1] == 256 else hf_ids) == prompt[0].tolist() + ours_gen.ids

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    our_tok = load_tokenizer(out)
    text = "héllo <|im_end|> wörld 😀\n\tdef f(): pass"
    assert hf_tok(text)["input_ids"] == our_tok.encode(text).ids
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token) == (256, 257, None)
    chat = [{"role": "user", "content": "hi"}]
    rendered = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert our_tok.encode(rendered).ids[:1] == [258]

    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.pad_token_id, gen.max_new_tokens) == (256, 257, 8)
    readme = (out / "README.md").read_text()
    assert (
        readme.startswith("---\nlibrary_name: transformers\n")
        and "- lmforge" in readme
        and "A test model." in readme
    )


def test_unsupported_folders_fail_with_what_was_found(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "mamba"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    save_file({"x": torch.zeros(1)}, str(other / "model.safetensors"))
    with pytest.raises(ConfigError) as e:
        load_hf(other)
    for name in ("MambaForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "BertForMaskedLM"):
        assert name in str(e.value)

    llama_folder(tmp_path / "small", vocab=200)  # the tokenizer has 260 tokens
    with pytest.raises(ConfigError, match="does not match the model"):
        import_hf(tmp_path / "small", tmp_path / "out1")

    llama_folder(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").rename(tmp_path / "llama" / "tokenizer.model")
    with pytest.raises(ConfigError, match="sentencepiece tokenizer.model but no tokenizer.json"):
        import_hf(tmp_path / "llama", tmp_path / "out2")
    (tmp_path / "llama" / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        import_hf(tmp_path / "llama", tmp_path / "out3")

    config_path = tmp_path / "llama" / "config.json"
    config = json.loads(config_path.read_text())
    for change, message in [
        ({"rope_parameters": {"rope_type": "mrope", "factor": 8.0, "rope_theta": 5e5}}, "RoPE scaling type 'mrope'"),
        ({"rope_scaling": {"type": "su", "factor": 2.0}}, "RoPE scaling type 'su'"),
        ({"hidden_act": "swiglu_oai"}, "activation 'swiglu_oai' is not supported"),
        ({"layer_types": ["full_attention"] * 5, "sliding_window": 4}, "layer_types has 5 entries"),
    ]:
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=message):
            load_hf(tmp_path / "llama")

    with pytest.raises(TypeError, match="Decoder"):
        export_hf(
            Encoder(bert_args(arch="llama")), tokenizer_file(tmp_path / "tok", CHAT_TOKENS), tmp_path / "x"
        )
