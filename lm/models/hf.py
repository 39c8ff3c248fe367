"""Hugging Face interop, both ways (issue #9, #20).

In: a folder that ``save_pretrained`` wrote (``config.json`` + safetensors weights, one file or
shards, + the tokenizer files) becomes one of our networks (:func:`load_hf`) or an lmforge model
folder with its tokenizer (:func:`import_hf`). Which families, and how each maps onto our networks,
is the table in :mod:`lm.models.family_table`. Out: our Decoder becomes a folder of its own family
(a tuned Qwen2 is a ``Qwen2ForCausalLM``; one trained from scratch a ``LlamaForCausalLM``) that
``transformers`` loads with ``from_pretrained`` (:func:`export_hf`).

config.json and the safetensors files are read here directly, so ``transformers`` is not needed at
run time (the tests use it to check that both directions give the same logits). Nothing here
downloads anything, and pickled weights (``pytorch_model.bin``) are never read: loading a pickle
runs code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lm.errors import ConfigError, DataError
from lm.fileio import atomic_write
from lm.models.family import Family
from lm.models.family_table import family_named, family_of
from lm.models.folder import MODEL_WEIGHTS, build_model, save_model
from lm.models.transformer import Decoder, count_params, llama_config_dict
from lm.text.tokenizer import TOKENIZER, load_tokenizer

CONFIG = "config.json"
WEIGHTS = MODEL_WEIGHTS  # Hugging Face names its (unsharded) weights file as lmforge does
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


def _read_weights(folder: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards its index names, memory-mapped (pages
    are read when a tensor is first used); floats cast to ``dtype`` (None: as stored)."""
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
            state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init) and
    their buffers (RoPE tables) on the CPU: the weights are then assigned, not copied."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load(
    folder: Path, max_seq_len: int | None, dtype: torch.dtype | None
) -> tuple[nn.Module, Family, str, dict[str, Any], list[str]]:
    """(network in eval mode, its family, the HF architecture, config.json, our parameters the
    folder did not hold (initialised at random)). The network holds the read tensors themselves
    (``dtype`` None: as stored), not copies."""
    if not is_hf_folder(folder):
        raise ConfigError(
            f"{folder} is not a Hugging Face model folder: it needs {CONFIG} and {WEIGHTS} (or {WEIGHTS_INDEX}); "
            "pickled pytorch_model.bin weights are not read (loading a pickle runs code): save them again "
            "with save_pretrained(..., safe_serialization=True)"
        )
    config = _read_json(folder / CONFIG)
    fam, name = family_of(folder, config)
    args = fam.read_config(folder, config, max_seq_len)
    try:
        state = fam.from_hf(_read_weights(folder, dtype), args)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{folder}: the weights do not fit {CONFIG} ({str(e)[:400]})") from None
    optional = [re.compile(p) for p in fam.optional]
    with _parameters_on_meta():
        model = build_model(args)
    ours = set(model.state_dict())
    tied = {"lm_head.weight"} if args.tie_embeddings else set()
    missing = sorted(ours - set(state) - tied)
    unexpected = sorted(set(state) - ours)
    if [k for k in missing if not any(p.match(k) for p in optional)] or unexpected:
        raise ConfigError(
            f"{folder}: the weights do not fit {CONFIG} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if missing:  # e.g. an encoder saved without its MLM head: those start at random
        model = build_model(args)
        model.load_state_dict(state, strict=False)
        if dtype is not None:
            model = model.to(dtype)
    else:
        try:
            model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:
            raise ConfigError(f"{folder}: the weights do not fit {CONFIG} ({str(e)[:400]})") from None
        if args.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), fam, name, config, missing


def load_hf(
    folder: str | os.PathLike, *, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Our network holding a ``save_pretrained`` folder's weights, in eval mode: a Decoder for each
    decoder family (lm.models.decoders), an encoder for each encoder family (lm.models.encoders). ``max_seq_len`` caps the
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
    family_of(folder, _read_json(folder / CONFIG))  # an architecture we cannot run is the first thing to say
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
    # The weights keep their stored dtype (bf16 stays bf16) and are written as read, not copied.
    model, fam, name, config, random_init = _load(folder, max_seq_len, None)
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
        "family": fam.name,
        "random_init": random_init,  # BertModel: the MLM head it does not have
        "files": copied,
    }


def _tokenizer_size(tok) -> int:
    """Rows of an embedding the tokenizer's ids index: its size, or its largest id + 1 if that is more."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def _front_matter(card: str | None, params: int, family: str) -> str:
    body = card or (
        f"# lmforge model\n\nA {params:,}-parameter {family} decoder trained with lmforge.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n'
    )
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- lmforge\n- {family}\n---\n\n"
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
    """Write our Decoder as a Hugging Face folder of its family (:func:`hf_config_and_state`) with its
    tokenizer, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``pipeline`` load it. Adapters
    must already be merged into the weights. ``special_tokens``: e.g. ``{"eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>", "bos_token": None}``; ``generation_config`` adds to the token ids
    (``{"max_new_tokens": 64, "do_sample": True, "temperature": 0.8}``); ``card``: README.md's text.
    Returns the names of the files written into ``out_dir``."""
    if not isinstance(model, Decoder):
        raise TypeError(f"export_hf writes a causal language model: it takes a Decoder, not a {type(model).__name__}")
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
    config, state = hf_config_and_state(model)
    # Our own model names exactly its tokens (None = none: LlamaConfig would default to ids 1 and 2);
    # an imported one keeps those of its family that export does not replace.
    config.update(token_ids if args.hf_config is None else {k: v for k, v in token_ids.items() if v is not None})
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
        "README.md": _front_matter(card, count_params(model), args.family),
    }
    for name, data in written.items():
        atomic_write(out_dir / name, data)
    return list(written)


def hf_config_and_state(model: Decoder) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the weights under Hugging Face's names for our Decoder. A model imported from
    a family (``args.hf_config``) goes out as that family, with the config it came with (sizes we
    changed updated) and its stored dtype; one trained from scratch as a float32 ``LlamaForCausalLM``."""
    args = model.args
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if args.hf_config is None:
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **llama_config_dict(args),
            # transformers 5 reads rope_parameters; earlier versions rope_theta (in llama_config_dict).
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        dtype = "float32"
        fam = family_named("llama")
    else:
        fam = family_named(args.family)
        config = {k: v for k, v in args.hf_config.items() if k not in ("_name_or_path", "transformers_version")}
        config["architectures"] = [fam.architectures[0]]
        config["vocab_size"] = args.vocab_size
        if args.positions == "learned":  # GPT-2: the position table was cut to seq_len on import
            config["n_positions"] = args.seq_len
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    config["torch_dtype"] = config["dtype"] = dtype  # transformers < 5 reads torch_dtype
    torch_dtype = getattr(torch, dtype)
    state = {k: v.to(torch_dtype).contiguous() for k, v in fam.to_hf(state, args).items()}
    return config, state


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_MODEL = "adapter_model.safetensors"


def export_adapter(
    model: Decoder,
    adapter: dict[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
    alpha: float,
    out_dir: str | os.PathLike,
    *,
    base: str | None = None,
) -> list[str]:
    """LoRA adapters trained on ``model``'s layers ({our module: (A (r, in), B (out, r))}) as a peft
    adapter folder in the family's own names, so ``peft.PeftModel.from_pretrained(base_model, out_dir)``
    on the model they were trained from (in its family's class) computes what the merged export does.
    Where the family stores several of our layers as one matrix (Phi-3's qkv_proj, GPT-2's c_attn),
    their adapters become one of the summed rank: A stacked, B block-diagonal, alpha scaled with the
    rank so alpha / r, and so every member's update, stays the same. ``base``: the base model's name
    or folder, written as ``base_model_name_or_path``."""
    args = model.args
    fam = family_named(args.family if args.hf_config is not None else "llama")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    group_of = {leaf: group for group in fam.fused for leaf in group}
    a_parts, b_parts = {}, {}  # under our weight names, as the family's to_hf joins weights
    for name in adapter:
        parent, leaf = name.rsplit(".", 1)
        group = group_of.get(leaf, (leaf,))
        for j, member in enumerate(group):
            key = f"{parent}.{member}.weight"
            if key in a_parts:
                continue
            out_features, in_features = shapes[key]
            A, B = adapter.get(f"{parent}.{member}", (torch.zeros(r, in_features), None))
            a_parts[key] = A
            b_parts[key] = torch.zeros(out_features, r * len(group))  # (out, R): B in its own columns
            if B is not None:
                b_parts[key][:, j * r : (j + 1) * r] = B
    hf_a, hf_b = fam.to_hf(a_parts, args), fam.to_hf(b_parts, args)
    state, ranks = {}, {}
    for key, A in hf_a.items():
        B = hf_b[key]
        if fam.transposed:  # to_hf wrote them as Conv1D weights; LoRA's A and B are not
            A, B = A.t(), B.t()
        module = key.removesuffix(".weight")
        state[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
        ranks[module.rsplit(".", 1)[-1]] = A.shape[0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(ranks),
        "fan_in_fan_out": fam.transposed,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: alpha * k / r for m, k in ranks.items() if k != r},
        "inference_mode": True,
    }
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / ADAPTER_MODEL, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write(out_dir / ADAPTER_CONFIG, _json(config))
    return [ADAPTER_CONFIG, ADAPTER_MODEL]


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"
