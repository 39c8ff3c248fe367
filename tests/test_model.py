"""The networks: causality, learning, padding, save/load, presets, and the Hugging Face Llama mapping."""

from __future__ import annotations

import pytest
import torch

from lm.config import MODEL_PRESETS, ModelConfig, load_config
from lm.errors import ConfigError
from lm.models.folder import build_model, load_model, save_model
from lm.models.hf import hf_config_and_state
from lm.models.transformer import (
    Decoder,
    Encoder,
    ModelArgs,
    SequenceClassifier,
    count_params,
    flops_per_token,
    llama_config_dict,
    model_args,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str = "decoder", **kw) -> ModelArgs:
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, seq_len=32, kind=kind)
    base.update(kw)
    return ModelArgs(**base)


def test_changing_a_future_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = Decoder(tiny()).eval()
    idx = torch.randint(0, 97, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_encoder_sees_both_directions_and_ignores_padding():
    torch.manual_seed(0)
    model = Encoder(tiny("encoder")).eval()
    idx = torch.randint(3, 97, (1, 16))
    later = idx.clone()
    later[0, 10] = (later[0, 10] + 1) % 97
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0][:, :10], model(later)[0][:, :10])  # bidirectional
        mask = torch.ones(1, 16, dtype=torch.bool)
        mask[0, 12:] = False
        other_pads = idx.clone()
        other_pads[0, 12:] = 1
        h1 = model.hidden_states(idx, mask)[:, :12]
        h2 = model.hidden_states(other_pads, mask)[:, :12]
    assert torch.allclose(h1, h2, atol=1e-6)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_tiny_model_overfits_a_small_batch(kind):
    torch.manual_seed(0)
    model = build_model(tiny(kind, seq_len=16))
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))  # random targets: only memorising brings the loss down
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_ignored_targets_do_not_count():
    model = Encoder(tiny("encoder")).eval()
    x = torch.randint(0, 97, (2, 8))
    y = torch.full((2, 8), -100)
    y[0, 3] = 5
    logits, loss = model(x, y)
    expected = torch.nn.functional.cross_entropy(logits[0, 3:4], torch.tensor([5]))
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_classifier_pooling_ignores_right_padding(kind):
    torch.manual_seed(0)
    clf = SequenceClassifier(build_model(tiny(kind)), num_classes=3).eval()
    idx = torch.randint(3, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    padded = idx.clone()
    padded[1, 7:] = 1
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        a, loss = clf(idx, mask, labels)
        b, _ = clf(padded, mask)
    assert a.shape == (2, 3) and loss.ndim == 0
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    torch.manual_seed(0)
    model = Decoder(tiny(tie_embeddings=tie)).eval()
    save_model(model, tmp_path, extra={"eot_id": 0, "pad_id": 1})
    loaded = load_model(tmp_path)
    x = torch.randint(0, 97, (2, 10))
    assert torch.equal(model(x)[0], loaded(x)[0])
    assert not loaded.training
    assert loaded.meta["eot_id"] == 0 and loaded.meta["kind"] == "decoder"
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_classifier_save_and_load_keeps_labels(tmp_path):
    clf = SequenceClassifier(Encoder(tiny("encoder")), num_classes=2).eval()
    save_model(clf, tmp_path, extra={"labels": ["neg", "pos"]})
    loaded = load_model(tmp_path)
    assert isinstance(loaded, SequenceClassifier) and loaded.meta["labels"] == ["neg", "pos"]
    x, m = torch.randint(0, 97, (3, 9)), torch.ones(3, 9, dtype=torch.bool)
    assert torch.equal(clf(x, m)[0], loaded(x, m)[0])


def test_presets_fill_the_dimensions_the_config_leaves_out_when_it_loads():
    cfg = ModelConfig(preset="small", n_layer=3, seq_len=64)
    assert (cfg.n_layer, cfg.d_model, cfg.n_kv_head, cfg.d_ff) == (
        3,
        MODEL_PRESETS["small"]["d_model"],
        MODEL_PRESETS["small"]["n_kv_head"],
        MODEL_PRESETS["small"]["d_ff"],
    )
    derived = ModelConfig(n_layer=2, n_head=2, d_model=96)
    assert derived.n_kv_head == 2 and derived.d_ff % 64 == 0 and derived.d_ff >= 8 * 96 // 3
    # Loaded once, dumped, loaded again: the same values (the stage's config.yaml is re-read by training).
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    args = model_args(cfg, vocab_size=8192)
    assert (args.n_layer, args.seq_len, args.vocab_size) == (3, 64, 8192)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.preset=huge", "model.preset='huge' is unknown"),
        ("model.n_kv_head=3", "multiple of model.n_kv_head=3"),
        ("model.n_head=3", "divisible by model.n_head=3"),
        ("model.seq_len=-1", "model.seq_len"),
    ],
)
def test_impossible_shapes_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_a_model_section_without_a_size_says_how_to_give_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  kind: decoder\n")
    with pytest.raises(ConfigError, match="model.n_layer is not set: pick model.preset"):
        load_config(path)


@pytest.mark.parametrize(
    "preset,vocab,low,high",
    [
        ("tiny", 8192, 0.3e6, 1.0e6),
        ("small", 8192, 4e6, 6.5e6),
        ("gpt2-124m", 50257, 118e6, 130e6),
        ("1b", 32000, 0.95e9, 1.25e9),
    ],
)
def test_preset_sizes(preset, vocab, low, high):
    args = model_args(ModelConfig(preset=preset, seq_len=1024), vocab)
    with torch.device("meta"):  # shapes only, no memory
        n = count_params(build_model(args))
    assert low <= n <= high, n
    # 6N dominates; the attention term is 12 L C T.
    assert flops_per_token(args) == pytest.approx(
        6 * (n - 0) + 12 * args.n_layer * args.d_model * 1024, rel=0.1
    )


def test_weights_map_onto_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    for tie in (True, False):
        args = tiny(tie_embeddings=tie)
        ours = Decoder(args).eval()
        ours.reset_parameters()
        with torch.no_grad():  # non-trivial norm weights, so a wrong mapping would show
            for name, p in ours.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(args))).eval()
        missing, unexpected = hf.load_state_dict(hf_config_and_state(ours)[1], strict=False)
        # A tied checkpoint leaves lm_head out: transformers ties it back to the embedding.
        assert not unexpected and all("rotary" in k or k == "lm_head.weight" and tie for k in missing)
        x = torch.randint(0, 97, (2, 20))
        with torch.no_grad():
            assert torch.allclose(ours(x)[0], hf(x).logits, atol=1e-5)
