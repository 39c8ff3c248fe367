"""The networks: a Llama-style decoder, a BERT-style encoder, a sequence classifier on either.

Plain ``nn.Module`` code that knows nothing of Lightning, MLflow or Prefect. The decoder is the
modern GPT form (Touvron et al. 2023, "LLaMA"): RoPE (Su et al. 2021), RMSNorm (Zhang & Sennrich
2019), SwiGLU MLP (Shazeer 2020), no biases, optional grouped-query attention (Ainslie et al.
2023), optional tied embeddings, attention through ``scaled_dot_product_attention`` (flash
kernels on GPU). Parameter names follow Hugging Face's ``LlamaForCausalLM`` so that export is a
prefix rename. Switches in :class:`ModelArgs` (biases, norms, positions, RoPE scaling, soft-capping,
sliding windows) make the same decoder compute the other families lmforge imports
(:mod:`lm.models.decoders` reads them from a ``config.json``).

Shapes: B batch, T sequence length, C d_model, H heads, K kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig
from lm.generation.kv_cache import KVCache


@dataclass
class ModelArgs:
    """Every dimension of a network, filled in (what ``model.json`` stores)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    seq_len: int
    kind: str = "decoder"  # decoder | encoder
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    # The block layout: llama (this module) | bert (lm.models.bert: learned positions, post-LN, biases).
    arch: str = "llama"
    # Width of one head; 0 = d_model // n_head. HF Llama configs may set head_dim otherwise.
    d_head: int = 0
    # The MLP nonlinearity: silu (llama's SwiGLU gate) | gelu (exact erf) | gelu_tanh | relu (bert).
    ffn_act: str = "silu"
    type_vocab_size: int = 2  # bert: segment (token type) embeddings

    # ---- family switches (lm.models.family_table reads them from a Hugging Face config.json) ----
    # Every default is our own Llama-style decoder, so model.json files written before these
    # fields existed load unchanged.
    family: str = "llama"  # the Hugging Face family the weights came from, and the one export writes
    # The config.json an imported model came with: export writes it back (the family's own
    # architecture, token ids, rope settings), only the sizes we changed updated.
    hf_config: dict[str, Any] | None = None
    attn_bias: bool = False  # q, k, v projections have biases (Qwen2, GPT-2)
    o_bias: bool = False  # the attention's output projection has one (GPT-2)
    mlp_bias: bool = False
    mlp: str = "gated"  # gated: down(act(gate x) * up x) | plain: down(act(up x)) (GPT-2)
    norm: str = "rms"  # rms | rms_1p: RMSNorm scaled by (1 + weight) (Gemma) | layer: LayerNorm with bias
    qk_norm: bool = False  # q and k RMS-normalised per head before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # attention and MLP outputs normed too, before the residual add (Gemma 2/3)
    positions: str = "rope"  # rope | learned (GPT-2: a position embedding table added to the tokens)
    # Hugging Face rope parameters beyond theta: {"rope_type": "llama3" | "linear" | "dynamic" | "yarn" |
    # "longrope", "factor": ..., ...}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rope_partial: float = 1.0  # share of each head's dimensions RoPE rotates (Phi-4-mini: 0.75)
    rope_local_theta: float = 0.0  # the RoPE base of sliding-window layers (Gemma 3); 0 = rope_theta
    rope_layers: list[int] | None = None  # per layer, 1 = RoPE, 0 = none (SmolLM3's NoPE layers); None = all
    embed_scale: bool = False  # embeddings multiplied by sqrt(d_model) (Gemma)
    attn_scale: float = 0.0  # the query scale; 0 = 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float = 0.0  # attention scores -> cap * tanh(scores / cap) (Gemma 2); 0 = none
    final_softcap: float = 0.0  # the same on the output logits (Gemma 2)
    sliding_window: int = 0  # a sliding layer's query reads the last sliding_window keys (its own included)
    layer_types: list[str] | None = None  # per layer, "full" | "sliding"; None = every layer sliding if
    # sliding_window else full
    position_offset: int = 0  # learned positions start at this row (RoBERTa: padding_idx + 1)

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    def layer_is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding"

    def layer_has_rope(self, layer: int) -> bool:
        return self.positions == "rope" and (self.rope_layers is None or bool(self.rope_layers[layer]))

    @property
    def plain(self) -> bool:
        """Our own Llama layout, with no family switch on but q/k/v biases (the lean decode path's)."""
        return (
            self.mlp == "gated" and self.ffn_act == "silu" and self.norm == "rms" and self.positions == "rope"
            and not (self.o_bias or self.mlp_bias or self.qk_norm or self.sandwich_norm or self.embed_scale
                     or self.attn_scale or self.attn_softcap or self.final_softcap or self.sliding_window
                     or self.rope_layers or self.rope_local_theta)
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def model_args(cfg: ModelConfig, vocab_size: int) -> ModelArgs:
    """The network a (loaded, so fully resolved) ``model`` config section describes."""
    return ModelArgs(
        vocab_size=int(vocab_size),
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_kv_head=cfg.n_kv_head,
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        seq_len=cfg.seq_len,
        kind=cfg.kind,
        tie_embeddings=cfg.tie_embeddings,
        dropout=cfg.dropout,
        rope_theta=cfg.rope_theta,
    )


class RMSNorm(nn.Module):
    """RMSNorm; ``offset=1`` scales by (1 + weight), Gemma's form (its weights are stored as offsets from 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like HF's LlamaRMSNorm, so bf16 runs match the exported model.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales in float32, then casts
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(args: ModelArgs, dim: int | None = None) -> nn.Module:
    """The family's normalisation over ``dim`` (default d_model) features."""
    dim = args.d_model if dim is None else dim
    if args.norm == "layer":
        return nn.LayerNorm(dim, eps=args.norm_eps)
    if args.norm not in ("rms", "rms_1p"):
        raise ValueError(f"unknown norm {args.norm!r}: rms, rms_1p or layer")
    return RMSNorm(dim, args.norm_eps, offset=1.0 if args.norm == "rms_1p" else 0.0)


def rope_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None, seq_len: int) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (dim/2,) of RoPE over ``dim`` rotated dimensions, and the factor cos and
    sin are multiplied by, for a model that reads up to ``seq_len`` positions. ``scaling``: Hugging
    Face's rope parameters (``rope_type`` and its keys, plus ``max_position_embeddings``):
    linear (position interpolation, Chen et al. 2023), dynamic (NTK-aware, fixed at ``seq_len``),
    llama3 (Llama 3.1's band-wise rescaling), yarn (Peng et al. 2023), longrope (Phi-3.5)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (dim/2,)
    inv_freq = 1.0 / theta**exponents
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    s = scaling
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "dynamic":
        max_pos = s["max_position_embeddings"]
        if seq_len <= max_pos:
            return inv_freq, 1.0
        base = theta * ((s["factor"] * seq_len / max_pos) - (s["factor"] - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)  # long waves: interpolate
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    if kind == "yarn":
        old = s["original_max_position_embeddings"]
        factor = s.get("factor") or s["max_position_embeddings"] / old
        attention = s.get("attention_factor")
        if attention is None:
            mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
            attention = mscale(s["mscale"]) / mscale(s["mscale_all_dim"]) if s.get("mscale") and s.get("mscale_all_dim") else mscale(1)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency (high frequencies), 0: interpolate it
        return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention)
    if kind == "longrope":
        old = s["original_max_position_embeddings"]
        factor = s.get("factor") or s["max_position_embeddings"] / old
        attention = s.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))
        # Hugging Face switches to the long factors when a forward reads past the original context;
        # our tables are built once, so a model configured beyond it uses them throughout.
        ext = torch.tensor(s["long_factor"] if seq_len > old else s["short_factor"], dtype=torch.float32)
        return 1.0 / (ext * theta**exponents), float(attention)
    raise ValueError(f"RoPE scaling type {kind!r} is not supported: linear, dynamic, llama3, yarn or longrope")


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device=None, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) cos and sin tables in HF's layout: the D/2 frequencies repeated twice."""
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling, seq_len)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.to(device))  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos() * attention, emb.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotate_half pairs dimension i with i + R/2, as HF's Llama does, over the first
    R = cos.shape[-1] dimensions (partial rotary: the rest pass through)."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :R], cos, sin), x[..., R:]), dim=-1)
    half = R // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf), HF's "gelu"
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # HF's "gelu_new", "gelu_pytorch_tanh"
    "relu": F.relu,
}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped], masked) v. q (B, H, T, D), k and v (B, K, S, D) -> (B, H, T, D).
    ``mask`` True = read; ``causal`` only when T == S and no mask is given. Query head h reads kv head
    h // (H/K), Hugging Face's repeat_kv order."""
    H, K = q.shape[1], k.shape[1]
    if not softcap:
        # SDPA groups the query heads itself: no copy of k and v per query head, in training (where
        # autograd would keep the copies) nor when decoding (a copy of the whole cache per step).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, dropout_p=dropout, scale=scale,
            enable_gqa=K != H,
        )
    if K != H:
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    # Gemma 2 caps the scores with cap * tanh(scores / cap) before the mask (Gemma Team 2024, sec. 2):
    # SDPA has no such hook, so this path writes attention out.
    scores = (q * (scale if scale is not None else q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)  # (B, H, T, S)
    scores = softcap * torch.tanh(scores / softcap)
    if causal and mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return F.dropout(p, dropout) @ v if dropout else p @ v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_proj = nn.Linear(args.d_model, args.n_head * args.head_dim, bias=args.attn_bias)
        self.k_proj = nn.Linear(args.d_model, args.n_kv_head * args.head_dim, bias=args.attn_bias)
        self.v_proj = nn.Linear(args.d_model, args.n_kv_head * args.head_dim, bias=args.attn_bias)
        self.o_proj = nn.Linear(args.n_head * args.head_dim, args.d_model, bias=args.o_bias)
        if args.qk_norm:  # per head, over D (Qwen3, Gemma 3)
            self.q_norm, self.k_norm = make_norm(args, args.head_dim), make_norm(args, args.head_dim)
        self.qk_norm = args.qk_norm
        self.scale = args.attn_scale or None
        self.softcap = args.attn_softcap
        self.dropout = args.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        causal: bool,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``cos`` None: a layer without positions (SmolLM3's NoPE layers, GPT-2's learned positions)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D): every key of the row so far
        y = attend(
            q, k, v, causal, mask, scale=self.scale, softcap=self.softcap, dropout=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """gated (SwiGLU, GeGLU): down(act(gate(x)) * up(x)); plain (GPT-2): down(act(up(x)))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.mlp == "gated":
            self.gate_proj = nn.Linear(args.d_model, args.d_ff, bias=args.mlp_bias)
        elif args.mlp != "plain":
            raise ValueError(f"unknown mlp {args.mlp!r}: gated or plain")
        self.up_proj = nn.Linear(args.d_model, args.d_ff, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.d_ff, args.d_model, bias=args.mlp_bias)
        self.gated = args.mlp == "gated"
        self.act = ACTIVATIONS[args.ffn_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm transformer block; the unit FSDP wraps. With ``sandwich_norm`` (Gemma 2/3) the
    attention's and the MLP's outputs are normed too: ``post_attention_layernorm`` then norms the
    attention's output and ``pre_feedforward_layernorm`` the MLP's input (Hugging Face's names)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = make_norm(args)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = make_norm(args)
        self.sandwich = args.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(args)
            self.post_feedforward_layernorm = make_norm(args)
        self.mlp = MLP(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(
        self,
        x,
        cos,
        sin,
        causal: bool,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, causal, mask, cache, layer)
        if self.sandwich:
            x = x + self.drop(self.post_attention_layernorm(h))
            return x + self.drop(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


# ---- decoding through the KV cache, without autograd ------------------------------------------------
# A decode step of a small model is mostly the cost of calling torch, not of arithmetic: the modules'
# forward above makes about 75 torch calls per layer (and 14 module calls). Reading the same weights
# with q, k, v stacked into one matrix and gate, up into another, RoPE applied to q and k at once,
# and RMSNorm as one fused call makes about 30, with the same results (tests/test_generate.py). Used
# by _cached_hidden_states when no gradient is wanted and every layer is the plain one (a LoRA
# adapter being trained wraps its layers: they then go through their modules), in our own layout
# (ModelArgs.plain: Llama, Mistral without a window, Qwen2, SmolLM2; other families take the modules).


def _plain_layers(net: nn.Module) -> bool:
    """Every layer is the plain one, unhooked (looked at once per KV cache: peft may wrap layers
    between two generations). ``net._lean_decode = False`` sends decoding through the modules (tests)."""
    plain = (nn.Linear, nn.Dropout, RMSNorm, Attention, MLP, Block)
    return net.__dict__.get("_lean_decode", True) and net.args.plain and all(
        type(m) in plain and not (m._forward_hooks or m._forward_pre_hooks)
        for layer in net.layers for m in layer.modules()
    )


def _stacked(layer: Block) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The layer's q, k, v weights as one matrix (and their biases as one vector, if any) and gate,
    up as another, rebuilt when they change."""
    a, m = layer.self_attn, layer.mlp
    parts = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight, m.up_proj.weight)
    biases = (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias) if a.q_proj.bias is not None else ()
    key = tuple((p.data_ptr(), p._version) for p in parts + biases)  # an optimizer step bumps _version
    cached = layer.__dict__.get("_stacked")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat(parts[:3]), torch.cat(biases) if biases else None, torch.cat(parts[3:]))
        layer.__dict__["_stacked"] = cached
    return cached[1], cached[2], cached[3]


def _rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, norm.eps).to(x.dtype)


def _decode_layers(net, x, cos, sin, causal, mask, cache) -> torch.Tensor:
    """The layers of ``net`` over x (B, T, C), as Block.forward with a cache computes them."""
    B, T, _ = x.shape
    for i, layer in enumerate(net.layers):
        a = layer.self_attn
        H, K, D = a.n_head, a.n_kv_head, a.head_dim
        qkv_w, qkv_b, gate_up_w = _stacked(layer)
        qkv = F.linear(_rms_norm(x, layer.input_layernorm), qkv_w, qkv_b).view(B, T, H + 2 * K, D).transpose(1, 2)
        qk = apply_rope(qkv[:, : H + K], cos, sin)
        k, v = cache.update(i, qk[:, H:], qkv[:, H + K :])
        y = F.scaled_dot_product_attention(qk[:, :H], k, v, attn_mask=mask, is_causal=causal, enable_gqa=K != H)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, -1), a.o_proj.weight)
        gate, up = F.linear(_rms_norm(x, layer.post_attention_layernorm), gate_up_w).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, layer.mlp.down_proj.weight)
    return x


class _Transformer(nn.Module):
    causal: bool

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model)
        if args.positions == "learned":
            self.embed_positions = nn.Embedding(args.position_offset + args.seq_len, args.d_model)
        elif args.positions != "rope":
            raise ValueError(f"unknown positions {args.positions!r}: rope or learned")
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = make_norm(args)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        rotary = int(args.head_dim * args.rope_partial)
        cos, sin = rope_cos_sin(args.seq_len, rotary, args.rope_theta, scaling=args.rope_scaling)
        # Not persistent: derived from args, so they never enter the state dict or the export.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if args.rope_local_theta:  # Gemma 3: sliding layers rotate with their own base, unscaled
            cos, sin = rope_cos_sin(args.seq_len, rotary, args.rope_local_theta)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)
        # Per layer: which RoPE table it reads (global, local, or none) and whether its window slides.
        self.layer_rope = [
            None if not args.layer_has_rope(i)
            else "local" if args.rope_local_theta and args.layer_is_sliding(i) else "global"
            for i in range(args.n_layer)
        ]
        self.layer_sliding = [args.layer_is_sliding(i) for i in range(args.n_layer)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer).
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif "norm" in name:  # a norm's gain: 1, or 0 where it is stored as an offset from 1
                    nn.init.zeros_(p) if self.args.norm == "rms_1p" else nn.init.ones_(p)
                else:
                    nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.args.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """idx (B, T) -> (B, T, C); ``positions``: the learned position rows to add ((T, C) or (B, T, C))."""
        x = self.embed_tokens(idx)
        if self.args.embed_scale:  # Gemma: sqrt(C), rounded to the embedding's dtype as Hugging Face does
            x = x * torch.tensor(self.args.d_model**0.5, dtype=x.dtype)
        if positions is not None:
            x = x + positions
        return x

    def _layer_inputs(self, i: int, tables: dict, causal: bool, mask, window_mask):
        cos, sin = tables.get(self.layer_rope[i], (None, None))
        if self.layer_sliding[i]:
            return cos, sin, False, window_mask
        return cos, sin, causal, mask

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., C) -> logits (..., V), soft-capped where the family does (Gemma 2)."""
        logits = self.lm_head(h)
        cap = self.args.final_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def hidden_states(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> final-norm hidden states (B, T, C). attention_mask (B, T) bool, True = real token.

        With a ``cache`` (decoder only), idx continues each row of the cache: its keys and values are
        stored there and the tokens attend to everything the row read before (right-padded rows).
        ``document_ids`` (B, T), decoder only: several documents packed in a window; a token attends
        to the earlier tokens of its own document only (RoPE scores depend on relative positions, so
        a document gives the same logits wherever it sits)."""
        B, T = idx.shape
        if cache is not None:
            return self._cached_hidden_states(idx, attention_mask, cache)
        if T > self.args.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len={self.args.seq_len}")
        causal, mask = self.causal, None
        if attention_mask is not None and not self.causal:
            # (B, 1, 1, T): every query may look at the real keys only.
            mask = attention_mask.bool()[:, None, None, :]
        if document_ids is not None:
            if not self.causal:
                raise ValueError("document_ids (packing) is for a decoder")
            earlier = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = ((document_ids[:, :, None] == document_ids[:, None, :]) & earlier)[:, None]  # (B, 1, T, T)
            causal = False  # the mask carries causality
        # A causal model with right padding needs no mask: real tokens never look at later pads.
        window = None
        if any(self.layer_sliding):
            q = torch.arange(T, device=idx.device)
            window = (q[None, :] <= q[:, None]) & (q[:, None] - q[None, :] < self.args.sliding_window)  # (T, T)
            window = window if mask is None else window & mask
        dtype = self.embed_tokens.weight.dtype
        tables = {"global": (self.rope_cos[:T].to(dtype), self.rope_sin[:T].to(dtype))}
        if self.args.rope_local_theta:
            tables["local"] = (self.rope_local_cos[:T].to(dtype), self.rope_local_sin[:T].to(dtype))
        positions = None
        if self.args.positions == "learned":
            off = self.args.position_offset
            positions = self.embed_positions.weight[off : off + T]  # (T, C)
        x = self._embed(idx, positions)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, *self._layer_inputs(i, tables, causal, mask, window))
        return self.norm(x)

    def _cached_hidden_states(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        if not self.causal:
            raise ValueError("only a decoder reads incrementally through a KV cache")
        dtype = self.embed_tokens.weight.dtype
        cos, sin, causal, mask = cache.begin(idx.shape[1], attention_mask, self.rope_cos, self.rope_sin)
        cos, sin = cos.to(dtype), sin.to(dtype)
        positions = None
        if self.args.positions == "learned":
            positions = cache.rope_at(self.embed_positions.weight[self.args.position_offset :])
            positions = positions[:, 0] if positions.dim() == 4 else positions  # (B, T, C) or (T, C)
        x = self._embed(idx, positions)  # (B, T, C)
        if cache.plain_layers is None:
            cache.plain_layers = _plain_layers(self)
        if not torch.is_grad_enabled() and cache.plain_layers:
            x = _decode_layers(self, x, cos, sin, causal, mask, cache)
        else:
            tables = {"global": (cos, sin)}
            if self.args.rope_local_theta:
                tables["local"] = (
                    cache.rope_at(self.rope_local_cos).to(dtype), cache.rope_at(self.rope_local_sin).to(dtype)
                )
            window = cache.window_mask(self.args.sliding_window) if any(self.layer_sliding) else None
            for i, layer in enumerate(self.layers):
                x = layer(x, *self._layer_inputs(i, tables, causal, mask, window), cache, i)
        cache.advance()
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V); loss is mean cross-entropy over targets != -100.
        ``cache``, ``document_ids``: see :meth:`hidden_states`."""
        logits = self.logits(self.hidden_states(idx, attention_mask, cache, document_ids))
        loss = None
        if targets is not None:
            loss = token_loss(logits, targets)
        return logits, loss


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (float32) of logits (..., V) over the targets (...) that are not -100."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class Decoder(_Transformer):
    """Causal language model; targets are the inputs shifted left by one (the caller shifts)."""

    causal = True


class Encoder(_Transformer):
    """Bidirectional masked language model (Devlin et al. 2019); targets -100 where not masked."""

    causal = False


class SequenceClassifier(nn.Module):
    """A backbone's pooled hidden state -> num_classes logits."""

    def __init__(self, backbone: _Transformer, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Linear(backbone.args.d_model, num_classes, bias=True)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def args(self) -> ModelArgs:
        return self.backbone.args

    def forward(
        self, idx: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.backbone.hidden_states(idx, attention_mask)  # (B, T, C)
        m = attention_mask.bool()
        if self.backbone.causal:
            # The last real token is the only one that has read the whole (right-padded) text.
            last = m.long().sum(1).clamp(min=1) - 1  # (B,)
            pooled = h[torch.arange(h.size(0), device=h.device), last]
        else:
            w = m.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        logits = self.head(pooled)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(args: ModelArgs) -> float:
    """Training FLOPs per token: 6 N for the matmul weights + 12 L C T for attention (PaLM, app. B)."""
    attn = args.d_model * (args.n_head + 2 * args.n_kv_head) * args.head_dim + args.d_model * args.d_model
    mlp = 3 * args.d_model * args.d_ff
    n_matmul = args.n_layer * (attn + mlp) + args.d_model * args.vocab_size  # the output projection
    return 6.0 * n_matmul + 12.0 * args.n_layer * args.d_model * args.seq_len


# ---- Hugging Face Llama config (lm.models.hf exports a model trained from scratch with it) ----------------
def llama_config_dict(args: ModelArgs, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` describing the same network."""
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.n_kv_head,
        max_position_embeddings=args.seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        head_dim=args.head_dim,
        **extra,
    )


