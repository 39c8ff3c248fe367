"""Hugging Face encoder families (lm.models.encoders): a tiny random checkpoint of each, written by
``save_pretrained``, gives transformers' logits and hidden states here, fine-tunes as a classifier
and round-trips through lmforge's own model folder."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import close, randomise

from lm.errors import ConfigError
from lm.models.bert import BertEncoder
from lm.models.family_table import family_named, family_of
from lm.models.folder import load_model, save_model
from lm.models.hf import load_hf
from lm.models.modernbert import ModernBertEncoder
from lm.models.transformer import SequenceClassifier

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 100
PAD = 1  # RoBERTa's usual padding_idx, so its positions start at row 2
LENGTHS = (12, 7)  # a right-padded batch; ModernBERT's local window (4 tokens) is shorter than both

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, pad_token_id=PAD)
# name -> (config, MaskedLM class, base class); built lazily: transformers is imported above.
CASES = {
    "bert": lambda t: (
        t.BertConfig(**SMALL, num_hidden_layers=2, max_position_embeddings=32),
        t.BertForMaskedLM,
        t.BertModel,
    ),
    "roberta": lambda t: (
        t.RobertaConfig(
            **SMALL, num_hidden_layers=2, max_position_embeddings=34, type_vocab_size=1, layer_norm_eps=1e-5
        ),
        t.RobertaForMaskedLM,
        t.RobertaModel,
    ),
    "distilbert": lambda t: (
        t.DistilBertConfig(
            vocab_size=VOCAB,
            dim=64,
            hidden_dim=96,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=32,
            pad_token_id=PAD,
            tie_word_embeddings=False,
        ),
        t.DistilBertForMaskedLM,
        t.DistilBertModel,
    ),
    "modernbert": lambda t: (
        t.ModernBertConfig(
            **SMALL,
            num_hidden_layers=3,
            max_position_embeddings=32,
            global_attn_every_n_layers=2,
            local_attention=4,
            global_rope_theta=1000.0,
            local_rope_theta=50.0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
        ),
        t.ModernBertForMaskedLM,
        t.ModernBertModel,
    ),
    # Every optional bias on, the output projection untied.
    "modernbert-biases": lambda t: (
        t.ModernBertConfig(
            **SMALL,
            num_hidden_layers=3,
            max_position_embeddings=32,
            global_attn_every_n_layers=2,
            local_attention=6,
            norm_bias=True,
            attention_bias=True,
            mlp_bias=True,
            classifier_bias=True,
            classifier_activation="gelu_new",
            tie_word_embeddings=False,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
        ),
        t.ModernBertForMaskedLM,
        t.ModernBertModel,
    ),
}


NETWORK = {
    "bert": BertEncoder,
    "roberta": BertEncoder,
    "distilbert": BertEncoder,
    "modernbert": ModernBertEncoder,
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, the MaskedLM, its folder, the base model, its folder): random weights, saved once per module."""
    config, mlm_cls, base_cls = CASES[request.param](transformers)
    config._attn_implementation = "sdpa"
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    mlm = randomise(mlm_cls(config))
    mlm.save_pretrained(root / "mlm")
    base = randomise(base_cls(config), seed=1)
    base.save_pretrained(root / "base")
    return request.param, mlm, root / "mlm", base, root / "base"


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """idx (2, 12) with no PAD among the real tokens, mask (2, 12): row 1 is right-padded."""
    idx = torch.randint(5, VOCAB, (2, max(LENGTHS)), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]
    idx[~mask] = PAD
    return idx, mask


def test_mlm_logits_equal_transformers(case):
    name, hf, folder, _, _ = case
    idx, mask = batch()
    family = name.split("-")[0]
    ours = load_hf(folder, max_seq_len=16)  # capped: position tables are cut to fit
    assert type(ours) is NETWORK[family] and ours.args.family == family and ours.args.seq_len == 16
    with torch.no_grad():
        want = hf(idx, attention_mask=mask.long()).logits
        got = ours(idx, attention_mask=mask)[0]
        close(got[mask], want[mask])  # pads' outputs are nobody's business
        close(ours(idx[:1])[0], hf(idx[:1]).logits)  # no mask at all
    if family == "modernbert":
        assert ours.args.layer_types == ["full", "sliding", "full"]
        # The window matters: one wider than the batch (every layer global) gives other logits.
        ours.args.sliding_window = max(LENGTHS)
        with torch.no_grad():
            assert not torch.allclose(ours(idx, attention_mask=mask)[0][mask], want[mask], atol=1e-2)


def test_base_model_gives_hidden_states_with_the_head_optional(case):
    _, _, _, hf, folder = case
    idx, mask = batch()
    ours = load_hf(folder)  # no MLM head in the folder: load_hf refuses a missing tensor that is not optional
    with torch.no_grad():
        close(
            ours.hidden_states(idx, mask)[mask], hf(idx, attention_mask=mask.long()).last_hidden_state[mask]
        )


def test_classifier_learns_and_round_trips(case, tmp_path):
    _, _, folder, _, _ = case
    encoder = load_hf(folder)
    # Two classes told apart by their tokens: low ids vs high ids, right-padded to 12.
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1] * 4)
    idx = torch.where(
        labels[:, None] == 0,
        torch.randint(5, 50, (8, 12), generator=g),
        torch.randint(50, VOCAB, (8, 12), generator=g),
    )
    mask = torch.ones(8, 12, dtype=torch.bool)
    mask[::3, 8:] = False
    idx[~mask] = PAD
    torch.manual_seed(0)
    net = SequenceClassifier(encoder, num_classes=2).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        _, loss = net(idx, mask, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    net.eval()
    save_model(net, tmp_path / "clf")
    loaded = load_model(tmp_path / "clf")
    assert type(loaded.backbone) is type(encoder) and loaded.args.family == encoder.args.family
    with torch.no_grad():
        close(loaded(idx, mask)[0], net(idx, mask)[0])


def test_encoder_round_trips_through_save_model(case, tmp_path):
    _, _, folder, _, _ = case
    encoder = load_hf(folder)
    save_model(encoder, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    idx, mask = batch()
    targets = torch.full_like(idx, -100)
    targets[:, 3] = idx[:, 3]
    with torch.no_grad():
        (want, want_loss), (got, got_loss) = encoder(idx, targets, mask), loaded(idx, targets, mask)
    close(got, want)
    close(got_loss, want_loss)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == encoder.args.tie_embeddings


@pytest.mark.parametrize(
    "name, changes, key",
    [
        ("roberta", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("roberta", {"hidden_act": "relu"}, "hidden_act"),
        ("distilbert", {"activation": "swish"}, "activation"),
        (
            "modernbert",
            {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}},
            "rope_parameters",
        ),
        (
            "modernbert",
            {"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
            "layer_types",
        ),
        ("bert", {"hidden_size": None}, "hidden_size"),
    ],
)
def test_settings_we_do_not_compute_name_the_file_and_key(tmp_path, name, changes, key):
    config, _, _ = CASES[name](transformers)
    c = {**config.to_dict(), **changes}
    with pytest.raises(ConfigError, match=rf"config\.json.*{key}"):
        family_named(name).read_config(tmp_path, c, None)


def test_modernbert_reads_older_configs_as_transformers_5_does(tmp_path):
    """Before transformers 5: global_rope_theta, local_rope_theta and global_attn_every_n_layers."""
    new = CASES["modernbert"](transformers)[0].to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(global_rope_theta=1000.0, local_rope_theta=50.0, global_attn_every_n_layers=2)
    fam = family_named("modernbert")
    a, b = fam.read_config(tmp_path, new, None), fam.read_config(tmp_path, old, None)
    assert (a.rope_theta, a.rope_local_theta, a.layer_types) == (1000.0, 50.0, ["full", "sliding", "full"])
    assert (b.rope_theta, b.rope_local_theta, b.layer_types) == (
        a.rope_theta,
        a.rope_local_theta,
        a.layer_types,
    )
    assert a.sliding_window == b.sliding_window == 3  # local_attention=4: |i - j| <= 2


def test_a_checkpoint_with_another_head_names_the_folder_and_tensor(tmp_path):
    """A token classifier whose config.json claims to be the masked LM: its head has no place here."""
    config = CASES["roberta"](transformers)[0]
    transformers.RobertaForTokenClassification(config).save_pretrained(tmp_path / "ner")
    c = json.loads((tmp_path / "ner" / "config.json").read_text())
    (tmp_path / "ner" / "config.json").write_text(json.dumps({**c, "architectures": ["RobertaForMaskedLM"]}))
    with pytest.raises(ConfigError, match=r"ner.*classifier\.(weight|bias).*RoBERTa"):
        load_hf(tmp_path / "ner")


def test_deberta_is_refused_with_the_encoders_we_read(tmp_path):
    with pytest.raises(ConfigError, match="DebertaV2ForMaskedLM.*RobertaForMaskedLM.*ModernBertModel"):
        family_of(tmp_path, {"architectures": ["DebertaV2ForMaskedLM"], "model_type": "deberta-v2"})
