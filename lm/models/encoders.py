"""The encoder families lmforge imports from Hugging Face, to fine-tune as classifiers.

BERT, RoBERTa and DistilBERT are one network, ``lm.models.bert.BertEncoder`` (post-LN, learned
positions, biases everywhere), told apart by two switches: where the position rows start
(``position_offset``) and how many token types there are (``type_vocab_size``, 0 = none).
ModernBERT is its own network, ``lm.models.modernbert.ModernBertEncoder`` (pre-norm, RoPE, local
attention, GeGLU). Each family here is how its ``config.json`` becomes ``ModelArgs`` and how its
checkpoint's tensor names become ours; the ``...Model`` variants (no MLM head) load too, with
the head left at random (``optional``). Export back to HF is not written for encoders
(``to_hf=None``): a fine-tuned classifier is exported in lmforge's own format.

DeBERTa (disentangled attention) is not here: its folders are refused with the list of what is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lm.errors import ConfigError
from lm.models.bert import BERT_NAME_MAP, from_bert_state_dict
from lm.models.family import Family, State, capped, need
from lm.models.modernbert import HF_ACTIVATIONS
from lm.models.transformer import ModelArgs

# HF hidden_act -> BertEncoder's ffn_act.
BERT_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# A checkpoint saved without its MLM head (BertModel, RobertaModel, ...): hidden states (and a
# classifier on them) are right, MLM logits are not.
HEAD = (r"^(head_dense|head_norm|lm_head)\.",)
# The layers LoRA adapts in BertEncoder (its MLP has no gate).
BERT_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _renamed(
    hf_state: State, prefix: str, name_map: list[tuple[str, str]], ignored: re.Pattern | None, family: str
) -> State:
    """The checkpoint's tensors under our names: ``prefix`` removed, then the first matching
    (regex, replacement) of ``name_map``. A name that matches neither it nor ``ignored`` is a
    ValueError (lm.models.hf's loader adds the folder and makes it a ConfigError)."""
    out = {}
    for hf_name, t in hf_state.items():
        name = hf_name.removeprefix(prefix)
        if ignored and ignored.match(name):
            continue
        for pattern, repl in name_map:
            if re.match(pattern, name):
                out[re.sub(pattern, repl, name)] = t
                break
        else:
            raise ValueError(
                f"the checkpoint holds {hf_name}, which lmforge's {family} network has no place for: "
                "is it a head other than masked LM (question answering, token classification)? "
                f"Save the {family} base model or its MaskedLM variant instead"
            )
    return out


def _fitted(state: State, args: ModelArgs) -> State:
    """Drop a tied output projection (the embeddings hold it) and cut the position table to seq_len,
    which max_seq_len may have capped below max_position_embeddings."""
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    if "embed_positions.weight" in state:
        state["embed_positions.weight"] = state["embed_positions.weight"][
            : args.position_offset + args.seq_len
        ]
    return state


# ---- BERT --------------------------------------------------------------------------------------


def read_bert(
    folder: Path,
    c: dict[str, Any],
    max_seq_len: int | None,
    *,
    family: str = "bert",
    position_offset: int = 0,
) -> ModelArgs:
    """BertConfig's keys (RoBERTa's are the same) -> ModelArgs for BertEncoder."""
    where = folder / "config.json"
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"{where}: position_embedding_type={c['position_embedding_type']!r}; lmforge's {family} "
            "has absolute positions only"
        )
    act = c.get("hidden_act", "gelu")
    if act not in BERT_ACTS:
        raise ConfigError(
            f"{where}: hidden_act={act!r} is not supported; lmforge's {family} has {', '.join(BERT_ACTS)}"
        )
    d_model, n_head = int(need(folder, c, "hidden_size")), int(need(folder, c, "num_attention_heads"))
    if d_model % n_head:
        raise ConfigError(f"{where}: hidden_size {d_model} does not split into num_attention_heads={n_head}")
    rows = int(c.get("max_position_embeddings", 512))
    if rows <= position_offset:
        raise ConfigError(
            f"{where}: max_position_embeddings={rows} leaves no position for a token "
            f"(positions start at pad_token_id + 1 = {position_offset})"
        )
    return ModelArgs(
        vocab_size=int(need(folder, c, "vocab_size")),
        n_layer=int(need(folder, c, "num_hidden_layers")),
        n_head=n_head,
        n_kv_head=n_head,
        d_model=d_model,
        d_ff=int(need(folder, c, "intermediate_size")),
        seq_len=capped(rows - position_offset, max_seq_len),
        kind="encoder",
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),  # BertConfig's default
        dropout=float(c.get("hidden_dropout_prob", 0.1)),
        norm_eps=float(c.get("layer_norm_eps", 1e-12)),
        arch="bert",
        ffn_act=BERT_ACTS[act],
        type_vocab_size=int(c.get("type_vocab_size", 2)),
        family=family,
        hf_config=c,
        attn_bias=True,
        o_bias=True,
        mlp_bias=True,
        mlp="plain",
        norm="layer",
        positions="learned",
        position_offset=position_offset,
    )


def bert_from_hf(hf_state: State, args: ModelArgs) -> State:
    try:
        return _fitted(from_bert_state_dict(hf_state, args.tie_embeddings), args)
    except KeyError as e:  # a ValueError like the other families', so that the message reads plainly
        raise ValueError(f"{e.args[0]}: the checkpoint is not a BertForMaskedLM or BertModel") from None


# ---- RoBERTa -----------------------------------------------------------------------------------
# Below "roberta." the body is named as BERT's; the MLM head is "lm_head".
ROBERTA_NAME_MAP: list[tuple[str, str]] = [
    *BERT_NAME_MAP,
    (r"^lm_head\.dense\.", "head_dense."),
    (r"^lm_head\.layer_norm\.", "head_norm."),
    (r"^lm_head\.decoder\.weight$", "lm_head.weight"),
    # HF ties decoder.bias to lm_head.bias; a checkpoint may hold either or both (equal).
    (r"^lm_head\.(decoder\.)?bias$", "lm_head.bias"),
]
ROBERTA_IGNORED = re.compile(r"^(pooler\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")


def read_roberta(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    where = folder / "config.json"
    # RobertaLMHead applies exact GELU whatever hidden_act says; BertEncoder's head uses ffn_act.
    if c.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(
            f"{where}: hidden_act={c['hidden_act']!r}; lmforge's RoBERTa needs 'gelu' (its MLM head always uses it)"
        )
    # fairseq numbers positions from padding_idx + 1 (rows 0..padding_idx are never a real token's).
    pad = 1 if c.get("pad_token_id") is None else int(c["pad_token_id"])  # RobertaConfig's default
    return read_bert(folder, c, max_seq_len, family="roberta", position_offset=pad + 1)


def roberta_from_hf(hf_state: State, args: ModelArgs) -> State:
    return _fitted(_renamed(hf_state, "roberta.", ROBERTA_NAME_MAP, ROBERTA_IGNORED, "RoBERTa"), args)


# ---- DistilBERT --------------------------------------------------------------------------------
DISTILBERT_NAME_MAP: list[tuple[str, str]] = [
    (r"^embeddings\.word_embeddings\.", "embed_tokens."),
    (r"^embeddings\.position_embeddings\.", "embed_positions."),
    (r"^embeddings\.LayerNorm\.", "embed_norm."),
    (r"^transformer\.layer\.(\d+)\.attention\.q_lin\.", r"layers.\1.q_proj."),
    (r"^transformer\.layer\.(\d+)\.attention\.k_lin\.", r"layers.\1.k_proj."),
    (r"^transformer\.layer\.(\d+)\.attention\.v_lin\.", r"layers.\1.v_proj."),
    (r"^transformer\.layer\.(\d+)\.attention\.out_lin\.", r"layers.\1.o_proj."),
    (r"^transformer\.layer\.(\d+)\.sa_layer_norm\.", r"layers.\1.attn_norm."),
    (r"^transformer\.layer\.(\d+)\.ffn\.lin1\.", r"layers.\1.up_proj."),
    (r"^transformer\.layer\.(\d+)\.ffn\.lin2\.", r"layers.\1.down_proj."),
    (r"^transformer\.layer\.(\d+)\.output_layer_norm\.", r"layers.\1.mlp_norm."),
    (r"^vocab_transform\.", "head_dense."),
    (r"^vocab_layer_norm\.", "head_norm."),
    (r"^vocab_projector\.", "lm_head."),
]
DISTILBERT_IGNORED = re.compile(r"^embeddings\.position_ids$")


def read_distilbert(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    where = folder / "config.json"
    act = c.get("activation", "gelu")
    if act not in BERT_ACTS:
        raise ConfigError(
            f"{where}: activation={act!r} is not supported; lmforge's DistilBERT has {', '.join(BERT_ACTS)}"
        )
    d_model, n_head = int(need(folder, c, "dim")), int(need(folder, c, "n_heads"))
    if d_model % n_head:
        raise ConfigError(f"{where}: dim {d_model} does not split into n_heads={n_head}")
    return ModelArgs(
        vocab_size=int(need(folder, c, "vocab_size")),
        n_layer=int(need(folder, c, "n_layers")),
        n_head=n_head,
        n_kv_head=n_head,
        d_model=d_model,
        d_ff=int(need(folder, c, "hidden_dim")),
        # sinusoidal_pos_embds=true only changes how the table was filled: it is in the checkpoint.
        seq_len=capped(int(c.get("max_position_embeddings", 512)), max_seq_len),
        kind="encoder",
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        dropout=float(c.get("dropout", 0.1)),
        norm_eps=1e-12,  # fixed in DistilBERT's code, not in its config
        arch="bert",
        ffn_act=BERT_ACTS[act],
        type_vocab_size=0,  # no segment embeddings
        family="distilbert",
        hf_config=c,
        attn_bias=True,
        o_bias=True,
        mlp_bias=True,
        mlp="plain",
        norm="layer",
        positions="learned",
    )


def distilbert_from_hf(hf_state: State, args: ModelArgs) -> State:
    state = _renamed(hf_state, "distilbert.", DISTILBERT_NAME_MAP, DISTILBERT_IGNORED, "DistilBERT")
    return _fitted(state, args)


# ---- ModernBERT --------------------------------------------------------------------------------
# Below "model."; Wqkv and Wi go to fused names first and are split by modernbert_from_hf.
MODERNBERT_NAME_MAP: list[tuple[str, str]] = [
    (r"^embeddings\.tok_embeddings\.", "embed_tokens."),
    (r"^embeddings\.norm\.", "embed_norm."),
    (r"^layers\.(\d+)\.attn_norm\.", r"layers.\1.attn_norm."),
    (r"^layers\.(\d+)\.attn\.Wqkv\.", r"layers.\1.qkv_proj."),
    (r"^layers\.(\d+)\.attn\.Wo\.", r"layers.\1.o_proj."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"layers.\1.mlp_norm."),
    (r"^layers\.(\d+)\.mlp\.Wi\.", r"layers.\1.gate_up_proj."),
    (r"^layers\.(\d+)\.mlp\.Wo\.", r"layers.\1.down_proj."),
    (r"^final_norm\.", "norm."),
    (r"^head\.dense\.", "head_dense."),
    (r"^head\.norm\.", "head_norm."),
    (r"^decoder\.", "lm_head."),
]
# HF's names for the two kinds of layer -> ModelArgs.layer_types'.
MODERNBERT_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def _modernbert_thetas(where: Path, c: dict[str, Any]) -> tuple[float, float]:
    """(global, local) RoPE bases. transformers 5 writes rope_parameters, one dict per layer type;
    older configs global_rope_theta and local_rope_theta. ModernBertConfig's defaults otherwise."""
    if c.get("rope_scaling"):
        raise ConfigError(
            f"{where}: rope_scaling={c['rope_scaling']} is not supported: lmforge's ModernBERT has plain RoPE only"
        )
    params = c.get("rope_parameters") or {}
    thetas = []
    for layer_type, old_key, default in (
        ("full_attention", "global_rope_theta", 160_000.0),
        ("sliding_attention", "local_rope_theta", 10_000.0),
    ):
        p = params.get(layer_type) or {}
        if p.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{where}: rope_parameters[{layer_type!r}]={p} is not supported: lmforge's ModernBERT has plain RoPE only"
            )
        # transformers 5 also writes the old keys, as null.
        thetas.append(float(p.get("rope_theta") or c.get(old_key) or default))
    return thetas[0], thetas[1]


def read_modernbert(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    where = folder / "config.json"
    for key in ("hidden_activation", "classifier_activation"):
        if c.get(key, "gelu") not in HF_ACTIVATIONS:
            raise ConfigError(
                f"{where}: {key}={c[key]!r} is not supported; lmforge's ModernBERT has {', '.join(HF_ACTIVATIONS)}"
            )
    d_model, n_head = int(need(folder, c, "hidden_size")), int(need(folder, c, "num_attention_heads"))
    if d_model % n_head:
        raise ConfigError(f"{where}: hidden_size {d_model} does not split into num_attention_heads={n_head}")
    n_layer = int(need(folder, c, "num_hidden_layers"))
    if c.get("layer_types"):
        unknown = set(c["layer_types"]) - set(MODERNBERT_LAYER_TYPES)
        if unknown or len(c["layer_types"]) != n_layer:
            raise ConfigError(
                f"{where}: layer_types must list {n_layer} of {', '.join(MODERNBERT_LAYER_TYPES)} "
                f"(got {c['layer_types']})"
            )
        layer_types = [MODERNBERT_LAYER_TYPES[t] for t in c["layer_types"]]
    else:  # older configs: every n-th layer (from layer 0) attends globally, the others locally
        every = int(c.get("global_attn_every_n_layers", 3))
        layer_types = ["sliding" if i % every else "full" for i in range(n_layer)]
    local = int(c.get("local_attention", 128))
    if local < 2:
        raise ConfigError(f"{where}: local_attention={local}; a window needs at least 2 tokens")
    global_theta, local_theta = _modernbert_thetas(where, c)
    return ModelArgs(
        vocab_size=int(need(folder, c, "vocab_size")),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_head,
        d_model=d_model,
        d_ff=int(need(folder, c, "intermediate_size")),
        seq_len=capped(int(c.get("max_position_embeddings", 8192)), max_seq_len),
        kind="encoder",
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        # One rate for embeddings, attention and MLP (all 0.0 in ModernBERT's releases): the largest.
        dropout=max(
            float(c.get(k) or 0.0) for k in ("embedding_dropout", "attention_dropout", "mlp_dropout")
        ),
        rope_theta=global_theta,
        rope_local_theta=local_theta,
        norm_eps=float(c.get("norm_eps", 1e-5)),
        arch="modernbert",
        ffn_act=HF_ACTIVATIONS[c.get("hidden_activation", "gelu")],
        type_vocab_size=0,
        family="modernbert",
        hf_config=c,
        attn_bias=bool(c.get("attention_bias", False)),
        o_bias=bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        mlp="gated",
        norm="layer" if c.get("norm_bias", False) else "layer_nobias",
        positions="rope",
        # HF's local window is local_attention tokens centred on the query, |i - j| <= local_attention // 2;
        # ours counts the query itself on each side, as a decoder's window counts it on its one side.
        sliding_window=local // 2 + 1,
        layer_types=layer_types,
    )


def modernbert_from_hf(hf_state: State, args: ModelArgs) -> State:
    state = _renamed(hf_state, "model.", MODERNBERT_NAME_MAP, None, "ModernBERT")
    out = {}
    for name, t in state.items():
        if ".qkv_proj." in name:  # rows: q for every head, then k, then v (HF's view(3, H, D))
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0), strict=True):
                out[name.replace("qkv_proj", part)] = chunk.contiguous()
        elif ".gate_up_proj." in name:  # rows: HF's "input" (through the activation), then its "gate"
            for part, chunk in zip(("gate_proj", "up_proj"), t.chunk(2, dim=0), strict=True):
                out[name.replace("gate_up_proj", part)] = chunk.contiguous()
        else:
            out[name] = t
    return _fitted(out, args)


FAMILIES: list[Family] = [
    Family(
        name="bert",
        architectures=("BertForMaskedLM", "BertModel"),
        model_types=("bert",),
        kind="encoder",
        read_config=read_bert,
        from_hf=bert_from_hf,
        lora_targets=BERT_LORA,
        optional=HEAD,
    ),
    Family(
        name="roberta",
        architectures=("RobertaForMaskedLM", "RobertaModel"),
        model_types=("roberta",),
        kind="encoder",
        read_config=read_roberta,
        from_hf=roberta_from_hf,
        lora_targets=BERT_LORA,
        optional=HEAD,
    ),
    Family(
        name="distilbert",
        architectures=("DistilBertForMaskedLM", "DistilBertModel"),
        model_types=("distilbert",),
        kind="encoder",
        read_config=read_distilbert,
        from_hf=distilbert_from_hf,
        lora_targets=BERT_LORA,
        optional=HEAD,
    ),
    Family(
        name="modernbert",
        architectures=("ModernBertForMaskedLM", "ModernBertModel"),
        model_types=("modernbert",),
        kind="encoder",
        read_config=read_modernbert,
        from_hf=modernbert_from_hf,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        optional=HEAD,
    ),
]
