"""Decoder families: each one's config.json read into our decoder's switches, and its weight names.

Every family runs on ``lm.models.transformer.Decoder``: the differences between Llama, Mistral, Qwen, Gemma,
Phi and GPT-2 are a handful of switches (``ModelArgs``: biases, norms, activation, positions,
RoPE scaling, soft-capping, sliding windows) and a name map. Most families already use Llama's
parameter names under ``model.``; Phi-3 fuses q/k/v and gate/up into one matrix each (split here,
joined again on export); GPT-2 stores ``Conv1D`` weights transposed, with learned positions.

Each function reads both spellings transformers has written: 4.x (``rope_theta``,
``rope_scaling``) and 5.x (``rope_parameters``, ``layer_types``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lm.errors import ConfigError
from lm.models.family import Family, State, capped, need
from lm.models.transformer import ModelArgs

# Hugging Face activation names -> ModelArgs.ffn_act.
ACTS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _rope(folder: Path, c: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling parameters or None, partial rotary factor) of a config, in either spelling
    (Gemma 3's per-layer-type parameters: those of its global layers)."""
    params = c.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    scaling = c.get("rope_scaling") or {}
    # A scaling type wins whichever spelling carries it (transformers 5 may write both).
    newer = params.get("rope_type", "default") != "default"
    merged = {**scaling, **params} if newer else {**params, **scaling}
    kind = (params["rope_type"] if newer else scaling.get("rope_type", scaling.get("type"))) or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"{folder / 'config.json'}: RoPE scaling type {kind!r} is not supported; lmforge reads {', '.join(ROPE_TYPES)}"
        )
    theta = float(merged.get("rope_theta", c.get("rope_theta", 10_000.0)))
    partial = float(merged.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    if kind == "default":
        return theta, None, partial
    out = {k: v for k, v in merged.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    out["rope_type"] = kind
    out.setdefault("original_max_position_embeddings", c.get("original_max_position_embeddings"))
    out["max_position_embeddings"] = c.get("max_position_embeddings")
    return theta, out, partial


def _layer_types(c: dict[str, Any], n_layer: int, every: int = 0) -> list[str] | None:
    """Per layer "full" / "sliding", from ``layer_types`` or, in older configs, the family's
    pattern (``every``: each every-th layer is full; 0 = all sliding when a window is set)."""
    if c.get("layer_types"):
        return ["sliding" if t == "sliding_attention" else "full" for t in c["layer_types"]]
    if c.get("use_sliding_window") is False or not c.get("sliding_window"):
        return None
    return ["full" if every and (i + 1) % every == 0 else "sliding" for i in range(n_layer)]


def _act(folder: Path, c: dict[str, Any], default: str) -> str:
    act = c.get("hidden_activation") or c.get("hidden_act") or c.get("activation_function") or default
    if act not in ACTS:
        raise ConfigError(f"{folder / 'config.json'}: activation {act!r} is not supported; lmforge has {', '.join(ACTS)}")
    return ACTS[act]


def _decoder_args(folder: Path, c: dict[str, Any], max_seq_len: int | None, family: str, *,
                  tie_default: bool, act_default: str = "silu", window_every: int = 0, **switches: Any) -> ModelArgs:
    """The shared reading of a Llama-like config.json; ``switches``: the family's own fields."""
    where = folder / "config.json"
    d_model, n_head = int(need(folder, c, "hidden_size")), int(need(folder, c, "num_attention_heads"))
    n_kv_head = int(c.get("num_key_value_heads") or n_head)
    head_dim = int(c.get("head_dim") or d_model // n_head)
    if n_head % n_kv_head or not c.get("head_dim") and d_model % n_head:
        raise ConfigError(f"{where}: {n_head} attention heads do not split evenly ({n_kv_head} kv heads, hidden {d_model})")
    n_layer = int(need(folder, c, "num_hidden_layers"))
    theta, scaling, partial = _rope(folder, c)
    layer_types = _layer_types(c, n_layer, window_every)
    window = int(c.get("sliding_window") or 0) if layer_types and "sliding" in layer_types else 0
    if layer_types is not None and len(layer_types) != n_layer:
        raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries for {n_layer} layers")
    args = dict(
        vocab_size=int(need(folder, c, "vocab_size")),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=d_model,
        d_ff=int(need(folder, c, "intermediate_size")),
        seq_len=capped(int(c.get("max_position_embeddings") or 2048), max_seq_len),
        kind="decoder",
        tie_embeddings=bool(c.get("tie_word_embeddings", tie_default)),
        rope_theta=theta,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        arch="llama",
        d_head=0 if head_dim * n_head == d_model else head_dim,
        ffn_act=_act(folder, c, act_default),
        family=family,
        hf_config=c,
        rope_scaling=scaling,
        rope_partial=partial,
        sliding_window=window,
        layer_types=layer_types if window else None,
    )
    args.update(switches)
    return ModelArgs(**args)


def _llama(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    bias = bool(c.get("attention_bias", False))
    return _decoder_args(folder, c, max_seq_len, "llama", tie_default=False,
                         attn_bias=bias, o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)))


def _mistral(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    return _decoder_args(folder, c, max_seq_len, "mistral", tie_default=False)


def _qwen2(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    # q, k, v carry biases, the output projection none (Bai et al. 2023, "Qwen Technical Report").
    return _decoder_args(folder, c, max_seq_len, "qwen2", tie_default=False, attn_bias=True)


def _qwen3(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    bias = bool(c.get("attention_bias", False))
    return _decoder_args(folder, c, max_seq_len, "qwen3", tie_default=False, attn_bias=bias, o_bias=bias, qk_norm=True)


def _smollm3(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    bias = bool(c.get("attention_bias", False))
    rope_layers = c.get("no_rope_layers")  # 1 = the layer uses RoPE (the name says the opposite)
    return _decoder_args(folder, c, max_seq_len, "smollm3", tie_default=True, attn_bias=bias, o_bias=bias,
                         mlp_bias=bool(c.get("mlp_bias", False)),
                         rope_layers=[int(x) for x in rope_layers] if rope_layers and not all(rope_layers) else None)


def _gemma_switches(c: dict[str, Any]) -> dict[str, Any]:
    scalar = c.get("query_pre_attn_scalar")
    return dict(norm="rms_1p", embed_scale=True, attn_scale=float(scalar) ** -0.5 if scalar else 0.0)


def _gemma(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    return _decoder_args(folder, c, max_seq_len, "gemma", tie_default=True, act_default="gelu_pytorch_tanh",
                         **_gemma_switches(c))


def _gemma2(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    # Gemma Team 2024, "Gemma 2": sandwich norms, soft-capped attention and logits, local and
    # global layers alternating (the first local).
    return _decoder_args(folder, c, max_seq_len, "gemma2", tie_default=True, act_default="gelu_pytorch_tanh",
                         window_every=2, sandwich_norm=True,
                         attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
                         final_softcap=float(c.get("final_logit_softcapping") or 0.0), **_gemma_switches(c))


def _gemma3(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    # Gemma Team 2025, "Gemma 3": Gemma 2's layout with q/k norms instead of attention soft-capping,
    # five local layers per global one, and a RoPE base of their own for the local layers.
    local = c.get("rope_local_base_freq")
    params = c.get("rope_parameters") or {}
    if isinstance(params.get("sliding_attention"), dict):
        local = params["sliding_attention"].get("rope_theta", local)
    return _decoder_args(folder, c, max_seq_len, "gemma3", tie_default=True, act_default="gelu_pytorch_tanh",
                         window_every=int(c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6),
                         sandwich_norm=True, qk_norm=True, rope_local_theta=float(local or 10_000.0),
                         attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
                         final_softcap=float(c.get("final_logit_softcapping") or 0.0), **_gemma_switches(c))


def _phi3(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    return _decoder_args(folder, c, max_seq_len, "phi3", tie_default=False, norm_eps=float(c.get("rms_norm_eps", 1e-5)))


def _gpt2(folder: Path, c: dict[str, Any], max_seq_len: int | None) -> ModelArgs:
    where = folder / "config.json"
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False), ("scale_attn_weights", True)):
        if bool(c.get(key, ok)) != ok:
            raise ConfigError(f"{where}: {key}={c[key]} is not supported (lmforge's GPT-2 has {key}={ok})")
    d_model, n_head = int(need(folder, c, "n_embd")), int(need(folder, c, "n_head"))
    if d_model % n_head:
        raise ConfigError(f"{where}: n_embd {d_model} does not split into {n_head} heads")
    return ModelArgs(
        vocab_size=int(need(folder, c, "vocab_size")),
        n_layer=int(need(folder, c, "n_layer")),
        n_head=n_head,
        n_kv_head=n_head,
        d_model=d_model,
        d_ff=int(c.get("n_inner") or 4 * d_model),
        seq_len=capped(int(c.get("n_positions") or 1024), max_seq_len),
        kind="decoder",
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        arch="llama",
        ffn_act=_act(folder, c, "gelu_new"),
        family="gpt2",
        hf_config=c,
        attn_bias=True,
        o_bias=True,
        mlp_bias=True,
        mlp="plain",
        norm="layer",
        positions="learned",
    )


# ---- weight names --------------------------------------------------------------------------


def _llama_from_hf(hf: State, args: ModelArgs) -> State:
    """Llama's layout: our names are Hugging Face's without the ``model.`` prefix."""
    state = {k.removeprefix("model."): v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _llama_to_hf(state: State, args: ModelArgs) -> State:
    out = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in state.items()}
    if args.tie_embeddings:
        out.pop("lm_head.weight", None)  # from_pretrained ties it back to the embedding
    return out


def _phi3_from_hf(hf: State, args: ModelArgs) -> State:
    """Phi-3 keeps q, k, v in one matrix (rows: H*D, K*D, K*D) and gate, up in another (halves)."""
    H, K, D = args.n_head, args.n_kv_head, args.head_dim
    out = {}
    for name, t in _llama_from_hf(hf, args).items():
        if name.endswith("self_attn.qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            out[stem + "q_proj.weight"], out[stem + "k_proj.weight"], out[stem + "v_proj.weight"] = t.split([H * D, K * D, K * D])
        elif name.endswith("mlp.gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            out[stem + "gate_proj.weight"], out[stem + "up_proj.weight"] = t.chunk(2)
        else:
            out[name] = t
    return out


def _phi3_to_hf(state: State, args: ModelArgs) -> State:
    out = {}
    for name, t in state.items():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            continue  # joined with q_proj / gate_proj below
        if name.endswith("self_attn.q_proj.weight"):
            stem = name.removesuffix("q_proj.weight")
            out[stem + "qkv_proj.weight"] = torch.cat([t, state[stem + "k_proj.weight"], state[stem + "v_proj.weight"]])
        elif name.endswith("mlp.gate_proj.weight"):
            stem = name.removesuffix("gate_proj.weight")
            out[stem + "gate_up_proj.weight"] = torch.cat([t, state[stem + "up_proj.weight"]])
        else:
            out[name] = t
    return _llama_to_hf(out, args)


# GPT-2's names (after ``transformer.``) -> ours; ``Conv1D`` weights are (in, out), Linear's (out, in).
_GPT2_NAMES = {
    "wte.weight": "embed_tokens.weight",
    "wpe.weight": "embed_positions.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
}
_GPT2_LAYER = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_from_hf(hf: State, args: ModelArgs) -> State:
    out = {}
    for name, t in hf.items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight":
            if not args.tie_embeddings:
                out[name] = t
            continue
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        if name in _GPT2_NAMES:
            out[_GPT2_NAMES[name]] = t[: args.seq_len] if name == "wpe.weight" else t
            continue
        _, i, rest = name.split(".", 2)  # h.<i>.<rest>
        if rest.endswith(_CONV1D):
            t = t.t()
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3), strict=True):
                out[f"layers.{i}.self_attn.{proj}.{kind}"] = part.contiguous()
            continue
        module, kind = rest.rsplit(".", 1)
        out[f"layers.{i}.{_GPT2_LAYER[module]}.{kind}"] = t.contiguous()
    return out


def _gpt2_to_hf(state: State, args: ModelArgs) -> State:
    inverse = {v: k for k, v in _GPT2_NAMES.items()}
    layer_inverse = {v: k for k, v in _GPT2_LAYER.items()}
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            if not args.tie_embeddings:
                out[name] = t
            continue
        if name in inverse:
            out[f"transformer.{inverse[name]}"] = t
            continue
        _, i, rest = name.split(".", 2)
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            proj, kind = rest.split(".")[1:]
            if proj != "q_proj":
                continue
            parts = [state[f"layers.{i}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            joined = torch.cat(parts)
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = joined.t().contiguous() if kind == "weight" else joined
            continue
        module, kind = rest.rsplit(".", 1)
        hf_name = f"{layer_inverse[module]}.{kind}"
        out[f"transformer.h.{i}.{hf_name}"] = t.t().contiguous() if hf_name.endswith(_CONV1D) else t
    return out


def _llama_like(name: str, architecture: str, read, model_type: str | None = None, **kw: Any) -> Family:
    return Family(name, (architecture,), (model_type or name,), "decoder", read, _llama_from_hf, _llama_to_hf, **kw)


FAMILIES: list[Family] = [
    _llama_like("llama", "LlamaForCausalLM", _llama),  # Llama 2, 3.x (RoPE scaling), SmolLM2
    _llama_like("mistral", "MistralForCausalLM", _mistral),
    _llama_like("qwen2", "Qwen2ForCausalLM", _qwen2),  # Qwen2, Qwen2.5
    _llama_like("qwen3", "Qwen3ForCausalLM", _qwen3),
    _llama_like("smollm3", "SmolLM3ForCausalLM", _smollm3),
    _llama_like("gemma", "GemmaForCausalLM", _gemma),
    _llama_like("gemma2", "Gemma2ForCausalLM", _gemma2),
    _llama_like("gemma3", "Gemma3ForCausalLM", _gemma3, model_type="gemma3_text"),
    Family("phi3", ("Phi3ForCausalLM",), ("phi3",), "decoder", _phi3, _phi3_from_hf, _phi3_to_hf,
           fused=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))),
    Family("gpt2", ("GPT2LMHeadModel", "GPT2Model"), ("gpt2",), "decoder", _gpt2, _gpt2_from_hf, _gpt2_to_hf,
           lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
           fused=(("q_proj", "k_proj", "v_proj"),), transposed=True),
]
