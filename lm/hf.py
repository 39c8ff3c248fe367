"""Hugging Face interop, both ways (issue #9).

In: a folder that ``save_pretrained`` wrote (``config.json`` + safetensors weights + the
tokenizer files) becomes one of our networks (:func:`load_hf`) or an lmforge model folder with its
tokenizer (:func:`import_hf`): ``LlamaForCausalLM`` -> ``lm.model.Decoder``, ``BertForMaskedLM`` and
``BertModel`` -> ``lm.bert.BertEncoder``. Out: our Decoder becomes a ``LlamaForCausalLM`` folder
that ``transformers`` loads with ``from_pretrained`` (:func:`export_hf`).

config.json and the safetensors files are read here directly, so ``transformers`` is not needed at
run time (the tests use it to check that both directions give the same logits). Nothing here
downloads anything, and pickled weights (``pytorch_model.bin``) are never read: loading a pickle
runs code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lm.errors import ConfigError, DataError
from lm.fileio import atomic_write
from lm.model import Decoder, ModelArgs, count_params, llama_config_dict, save_model, to_llama_state_dict
from lm.tokenizer import TOKENIZER, load_tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights: tensor name -> shard file
# Copied next to tokenizer.json by import_hf when present (transformers 5 keeps a chat template in
# chat_template.jinja, older versions in tokenizer_config.json).
TOKENIZER_SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")

# The architectures we load -> our ``ModelArgs.arch``.
SUPPORTED = {"LlamaForCausalLM": "llama", "BertForMaskedLM": "bert", "BertModel": "bert"}
# A config.json that names no architecture: its model_type's usual one.
BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}
# HF hidden_act -> BertEncoder's ffn_act.
BERT_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder as ``save_pretrained`` writes it: config.json + model.safetensors (or its sharded index)."""
    p = Path(path)
    return (
        p.is_dir() and (p / CONFIG).is_file() and ((p / WEIGHTS).is_file() or (p / WEIGHTS_INDEX).is_file())
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read as JSON: {e}") from None


def hf_architecture(folder: Path, config: dict[str, Any]) -> str:
    """The supported architecture config.json names, else a ConfigError that says what it found."""
    found = config.get("architectures") or []
    for name in found:
        if name in SUPPORTED:
            return name
    if not found and config.get("model_type") in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[config["model_type"]]
    raise ConfigError(
        f"{folder}: a Hugging Face model with architectures={found} (model_type={config.get('model_type')!r}), "
        f"which lmforge does not load; supported: {', '.join(SUPPORTED)}"
    )


def _need(folder: Path, config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ConfigError(f"{folder / CONFIG} has no {key!r}")
    return config[key]


def _llama_args(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    where = folder / CONFIG
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ConfigError(f"{where}: {key}=true, but lmforge's Llama decoder has no biases")
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"{where}: hidden_act={c['hidden_act']!r}, but lmforge's Llama decoder uses silu (SwiGLU)"
        )
    # transformers < 5 writes rope_theta + rope_scaling, transformers 5 rope_parameters.
    scaling, params = c.get("rope_scaling") or {}, c.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    if rope_type != "default":
        raise ConfigError(
            f"{where}: RoPE scaling {scaling or params} is not supported: lmforge's decoder implements plain RoPE only"
        )
    d_model, n_head = int(_need(folder, c, "hidden_size")), int(_need(folder, c, "num_attention_heads"))
    n_kv_head = int(c.get("num_key_value_heads") or n_head)
    head_dim = int(c.get("head_dim") or d_model // n_head)
    if n_head % n_kv_head or not c.get("head_dim") and d_model % n_head:
        raise ConfigError(
            f"{where}: {n_head} attention heads do not split evenly ({n_kv_head} kv heads, hidden {d_model})"
        )
    seq_len = int(c.get("max_position_embeddings", 2048))
    return ModelArgs(
        vocab_size=int(_need(folder, c, "vocab_size")),
        n_layer=int(_need(folder, c, "num_hidden_layers")),
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=d_model,
        d_ff=int(_need(folder, c, "intermediate_size")),
        seq_len=min(seq_len, max_seq_len) if max_seq_len else seq_len,
        kind="decoder",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),  # LlamaConfig's default
        rope_theta=float(params.get("rope_theta", c.get("rope_theta", 10_000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        arch="llama",
        d_head=0 if head_dim * n_head == d_model else head_dim,
    )


def _bert_args(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    where = folder / CONFIG
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"{where}: position_embedding_type={c['position_embedding_type']!r}; lmforge's BERT has absolute positions only"
        )
    act = c.get("hidden_act", "gelu")
    if act not in BERT_ACTS:
        raise ConfigError(
            f"{where}: hidden_act={act!r} is not supported; lmforge's BERT has {', '.join(BERT_ACTS)}"
        )
    d_model, n_head = int(_need(folder, c, "hidden_size")), int(_need(folder, c, "num_attention_heads"))
    if d_model % n_head:
        raise ConfigError(f"{where}: hidden_size {d_model} does not split into {n_head} heads")
    seq_len = int(c.get("max_position_embeddings", 512))
    return ModelArgs(
        vocab_size=int(_need(folder, c, "vocab_size")),
        n_layer=int(_need(folder, c, "num_hidden_layers")),
        n_head=n_head,
        n_kv_head=n_head,
        d_model=d_model,
        d_ff=int(_need(folder, c, "intermediate_size")),
        seq_len=min(seq_len, max_seq_len) if max_seq_len else seq_len,
        kind="encoder",
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),  # BertConfig's default
        dropout=float(c.get("hidden_dropout_prob", 0.1)),
        norm_eps=float(c.get("layer_norm_eps", 1e-12)),
        arch="bert",
        ffn_act=BERT_ACTS[act],
        type_vocab_size=int(c.get("type_vocab_size", 2)),
    )


def _read_weights(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards its index names; floats cast to ``dtype``."""
    from safetensors.torch import load_file

    if (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        index = _read_json(folder / WEIGHTS_INDEX)
        files = sorted(set(index.get("weight_map", {}).values()))
    state = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"{path} does not exist (named by {folder / WEIGHTS_INDEX})")
        for key, t in load_file(str(path)).items():
            state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


def _load(
    folder: Path, max_seq_len: int | None, dtype: torch.dtype
) -> tuple[nn.Module, str, dict[str, Any], list[str]]:
    """(network in eval mode, HF architecture, config.json, our parameters the folder did not hold)."""
    from lm.bert import BertEncoder, from_bert_state_dict

    if not is_hf_folder(folder):
        raise ConfigError(
            f"{folder} is not a Hugging Face model folder: it needs {CONFIG} and {WEIGHTS} (or {WEIGHTS_INDEX}); "
            "pickled pytorch_model.bin weights are not read (loading a pickle runs code): save them again "
            "with save_pretrained(..., safe_serialization=True)"
        )
    config = _read_json(folder / CONFIG)
    name = hf_architecture(folder, config)
    hf_state = _read_weights(folder, torch.float32)
    optional: set[str] = set()
    if SUPPORTED[name] == "llama":
        args = _llama_args(folder, config, max_seq_len)
        # Checkpoints from before transformers 4.31 also hold RoPE's inverse frequencies (derived).
        state = {
            k.removeprefix("model."): v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")
        }
        if args.tie_embeddings:
            state.pop("lm_head.weight", None)
        model: nn.Module = Decoder(args)
    else:
        args = _bert_args(folder, config, max_seq_len)
        try:
            state = from_bert_state_dict(hf_state, args.tie_embeddings)
        except KeyError as e:
            raise ConfigError(f"{folder}: {e.args[0]}") from None
        if "embed_positions.weight" in state:  # seq_len may be capped below max_position_embeddings
            state["embed_positions.weight"] = state["embed_positions.weight"][: args.seq_len]
        model = BertEncoder(args)
        # BertModel has no MLM head: hidden states (and a classifier on them) are right, MLM logits are not.
        optional = {k for k in model.state_dict() if re.match(r"^(head_dense|head_norm|lm_head)\.", k)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"{folder}: the weights do not fit {CONFIG} ({str(e)[:400]})") from None
    missing = [k for k in missing if not (args.tie_embeddings and k == "lm_head.weight")]
    if [k for k in missing if k not in optional] or unexpected:
        raise ConfigError(
            f"{folder}: the weights do not fit {CONFIG} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(dtype).eval(), name, config, sorted(missing)


def load_hf(
    folder: str | os.PathLike, *, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Our network holding a ``save_pretrained`` folder's weights, in eval mode: a Decoder for
    LlamaForCausalLM, a BertEncoder for BertForMaskedLM / BertModel. ``max_seq_len`` caps the
    model's ``seq_len`` (else ``max_position_embeddings``); bf16/fp16 weights become ``dtype``."""
    return _load(Path(folder), max_seq_len, dtype)[0]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...} in older files
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tok, side: dict[str, dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """{eos_token: "</s>", eos_token_id: 2, ...} by the names tokenizer_config.json (else
    special_tokens_map.json) gives, else by the ids config.json / generation_config.json give."""
    out: dict[str, Any] = {}
    sources = [side.get("tokenizer_config.json", {}), side.get("special_tokens_map.json", {})]
    id_sources = [config, side.get("generation_config.json", {})]
    for key in SPECIAL_TOKENS:
        text = next((t for s in sources if (t := _token_text(s.get(key))) is not None), None)
        if text is None:
            ids = [s[f"{key}_id"] for s in id_sources if s.get(f"{key}_id") is not None]
            if ids:
                first = ids[0][0] if isinstance(ids[0], list) else ids[0]  # eos_token_id may be a list
                text = tok.id_to_token(int(first))
        token_id = None if text is None else tok.token_to_id(text)
        if token_id is not None:
            out[key], out[f"{key}_id"] = text, token_id
    return out


def import_hf(
    folder: str | os.PathLike, out_dir: str | os.PathLike, *, max_seq_len: int | None = None
) -> dict[str, Any]:
    """Write a ``save_pretrained`` folder as an lmforge model folder (``save_model``) with its
    tokenizer.json and tokenizer side files; returns what was found (architecture, sizes, special
    tokens). model.json records eot_id, pad_id and mask_id as lmforge's own models do."""
    folder, out_dir = Path(folder), Path(out_dir)
    hf_architecture(folder, _read_json(folder / CONFIG))  # an architecture we cannot run is the first thing to say
    tok_path = folder / TOKENIZER
    if not tok_path.is_file():
        if (folder / "tokenizer.model").is_file():
            raise ConfigError(
                f"{folder} has a sentencepiece tokenizer.model but no {TOKENIZER}: lmforge reads only Hugging Face "
                f"tokenizers' {TOKENIZER}. Convert it once where transformers and sentencepiece are installed: "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes it"
            )
        raise ConfigError(
            f"{folder} has no {TOKENIZER}: lmforge needs the model's own tokenizer (Hugging Face tokenizers format)"
        )
    try:
        tok = load_tokenizer(tok_path)
    except DataError as e:
        raise ConfigError(str(e)) from None
    model, name, config, random_init = _load(folder, max_seq_len, torch.float32)
    args = model.args
    n_tokens = _tokenizer_size(tok)
    if n_tokens > args.vocab_size:
        raise ConfigError(
            f"{folder}: a tokenizer whose vocabulary does not match the model: {TOKENIZER} has {n_tokens} tokens, "
            f"the model's embedding {args.vocab_size} rows"
        )
    side = {
        n: _read_json(folder / n)
        for n in TOKENIZER_SIDE_FILES
        if n.endswith(".json") and (folder / n).is_file()
    }
    tokens = _special_tokens(tok, side, config)
    eot_id = tokens.get("eos_token_id", tokens.get("sep_token_id"))
    ids = {
        "eot_id": eot_id,
        "pad_id": tokens.get("pad_token_id", eot_id),
        "mask_id": tokens.get("mask_token_id"),
    }
    save_model(
        model, out_dir, extra={"hf_architecture": name, **{k: v for k, v in ids.items() if v is not None}}
    )
    copied = [TOKENIZER, *(n for n in TOKENIZER_SIDE_FILES if (folder / n).is_file())]
    for n in copied:
        atomic_write(out_dir / n, (folder / n).read_bytes())
    return {
        "architecture": name,
        "arch": args.arch,
        "kind": args.kind,
        "params": count_params(model),
        "vocab_size": args.vocab_size,
        "tokenizer_vocab_size": n_tokens,
        "seq_len": args.seq_len,
        **tokens,
        "random_init": random_init,  # BertModel: the MLM head it does not have
        "files": copied,
    }


def _tokenizer_size(tok) -> int:
    """Rows of an embedding the tokenizer's ids index: its size, or its largest id + 1 if that is more."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def _front_matter(card: str | None, params: int) -> str:
    body = card or (
        f"# lmforge model\n\nA {params:,}-parameter Llama-architecture decoder trained with lmforge.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n'
    )
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- lmforge\n- llama\n---\n\n"
        + body
    )


def export_hf(
    model: nn.Module,
    tokenizer_json: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    chat_template: str | None = None,
    special_tokens: dict[str, str | None] | None = None,
    generation_config: dict[str, Any] | None = None,
    card: str | None = None,
) -> list[str]:
    """Write our Decoder as a Hugging Face ``LlamaForCausalLM`` folder (float32 weights) with its
    tokenizer, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``pipeline`` load it. Adapters
    must already be merged into the weights. ``special_tokens``: e.g. ``{"eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>", "bos_token": None}``; ``generation_config`` adds to the token ids
    (``{"max_new_tokens": 64, "do_sample": True, "temperature": 0.8}``); ``card``: README.md's text.
    Returns the names of the files written into ``out_dir``."""
    if not isinstance(model, Decoder):
        raise TypeError(
            f"export_hf writes a LlamaForCausalLM: it takes a Decoder, not a {type(model).__name__}"
        )
    args = model.args
    tok_path = Path(tokenizer_json)
    tok_path = tok_path / TOKENIZER if tok_path.is_dir() else tok_path
    tok = load_tokenizer(tok_path)
    if _tokenizer_size(tok) > args.vocab_size:
        raise ConfigError(
            f"{tok_path}: a tokenizer whose vocabulary does not match the model: {_tokenizer_size(tok)} tokens, "
            f"the model's embedding {args.vocab_size} rows"
        )
    tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    ids: dict[str, int] = {}
    for key, text in tokens.items():
        if key not in SPECIAL_TOKENS:
            raise ValueError(f"special_tokens: unknown key {key!r}; use {', '.join(SPECIAL_TOKENS)}")
        token_id = tok.token_to_id(text)
        if token_id is None:
            raise ConfigError(f"special token {key}={text!r} is not in the vocabulary of {tok_path}")
        ids[f"{key}_id"] = token_id
    token_ids = {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **llama_config_dict(args),
        # transformers 5 reads rope_parameters; earlier versions rope_theta (in llama_config_dict).
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",  # transformers < 5
        "dtype": "float32",
        **token_ids,
    }
    # HF's tied checkpoints leave lm_head.weight out; from_pretrained ties it back to the embedding.
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in to_llama_state_dict(model).items()
    }
    if args.tie_embeddings:
        del state["lm_head.weight"]
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": args.seq_len,
        "clean_up_tokenization_spaces": False,  # decoding must give back the text byte for byte
        "model_input_names": ["input_ids", "attention_mask"],  # Llama takes no token_type_ids
        **tokens,
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template

    from safetensors.torch import save_file

    written = {
        CONFIG: _json(config),
        WEIGHTS: lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
        TOKENIZER: tok_path.read_bytes(),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(tokens),
        "generation_config.json": _json(
            {**{k: v for k, v in token_ids.items() if v is not None}, **(generation_config or {})}
        ),
        "README.md": _front_matter(card, count_params(model)),
    }
    for name, data in written.items():
        atomic_write(out_dir / name, data)
    return list(written)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"
