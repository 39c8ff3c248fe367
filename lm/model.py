"""The networks: a Llama-style decoder, a BERT-style encoder, a sequence classifier on either.

Plain ``nn.Module`` code that knows nothing of Lightning, MLflow or Prefect. The decoder is the
modern GPT form (Touvron et al. 2023, "LLaMA"): RoPE (Su et al. 2021), RMSNorm (Zhang & Sennrich
2019), SwiGLU MLP (Shazeer 2020), no biases, optional grouped-query attention (Ainslie et al.
2023), optional tied embeddings, attention through ``scaled_dot_product_attention`` (flash
kernels on GPU). Parameter names follow Hugging Face's ``LlamaForCausalLM`` so that export is a
prefix rename (:data:`LLAMA_NAME_MAP`, :func:`to_llama_state_dict`).

Shapes: B batch, T sequence length, C d_model, H heads, K kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig
from lm.fileio import atomic_write


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
    # The block layout: llama (this module) | bert (lm.bert: learned positions, post-LN, biases).
    arch: str = "llama"
    # Width of one head; 0 = d_model // n_head. HF Llama configs may set head_dim otherwise.
    d_head: int = 0
    # The MLP nonlinearity: silu (llama's SwiGLU gate) | gelu (exact erf) | gelu_tanh | relu (bert).
    ffn_act: str = "silu"
    type_vocab_size: int = 2  # bert: segment (token type) embeddings

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like HF's LlamaRMSNorm, so bf16 runs match the exported model.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) cos and sin tables in HF's layout: the D/2 frequencies repeated twice."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotate_half pairs dimension i with i + D/2, as HF's Llama does."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """The keys (RoPE applied) and values a decoder has computed, kept for incremental decoding.

    ``keys`` and ``values`` (L, B, K, S, D) are allocated once for S = ``max_len`` positions; row b
    holds its first ``lengths[b]`` positions. Each row is its own sequence with its own length, so
    prompts of different lengths need no left padding and every row's RoPE positions start at 0.
    Pass it to ``hidden_states``/``forward`` to read T more tokens per row: they are written at
    positions ``lengths[b] .. lengths[b] + n_b - 1`` (n_b = the row's real tokens, right-padded).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: list[int]):
        self.keys, self.values = keys, values  # (L, B, K, S, D)
        self.lengths = list(lengths)  # on the host: shapes and fast paths need no device sync
        self._step: _CacheStep | None = None
        # Whether the model's layers are all plain ones (lm.model._plain_layers), decided at the
        # cache's first forward: walking the modules on every decode step cost ~2% of a step.
        self.plain_layers: bool | None = None

    @classmethod
    def empty(
        cls, args: ModelArgs, batch: int, max_len: int | None = None, *, device=None, dtype=torch.float32
    ) -> KVCache:
        max_len = args.seq_len if max_len is None else max_len
        if not 0 < max_len <= args.seq_len:
            raise ValueError(f"max_len={max_len} must be in 1..seq_len={args.seq_len}")
        shape = (args.n_layer, batch, args.n_kv_head, max_len, args.head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            [0] * batch,
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def __len__(self) -> int:
        return len(self.lengths)

    def select(self, rows: list[int]) -> KVCache:
        """A cache of these rows only, in this order (drops finished sequences from a batch)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.keys.device)
        return KVCache(
            self.keys.index_select(1, idx), self.values.index_select(1, idx), [self.lengths[r] for r in rows]
        )

    @staticmethod
    def cat(caches: list[KVCache]) -> KVCache:
        """One cache holding the rows of all of them (adds sequences to a running batch)."""
        if len({c.max_len for c in caches}) != 1:
            raise ValueError("caches of different max_len cannot be joined")
        return KVCache(
            torch.cat([c.keys for c in caches], 1),
            torch.cat([c.values for c in caches], 1),
            [n for c in caches for n in c.lengths],
        )

    def begin(
        self, T: int, attention_mask: torch.Tensor | None, rope_cos: torch.Tensor, rope_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]:
        """Plan a forward of T tokens per row: RoPE tables at each row's positions, whether plain causal
        attention applies, and the attention mask otherwise. ``update`` then writes each layer."""
        n_new = [T] * len(self) if attention_mask is None else attention_mask.sum(1).tolist()
        if any(n + m > self.max_len for n, m in zip(self.lengths, n_new, strict=True)):
            raise ValueError(
                f"the KV cache holds {self.max_len} positions: {self.lengths} + {n_new} do not fit"
            )
        device = self.keys.device
        start = self.lengths[0]
        if all(n == start for n in self.lengths) and start + T <= self.max_len:
            # Every row at the same position (one stream, or a fresh batch): plain slices. Right pads are
            # written too, beyond the row's length, where later tokens overwrite them unread.
            self._step = _CacheStep(n_new, start, start + T)
            cos, sin = rope_cos[start : start + T], rope_sin[start : start + T]  # (T, D)
            if start == 0:
                return cos, sin, True, None  # prefill: attend to the new tokens only, as training does
            if T == 1:
                return cos, sin, False, None  # one query per row may read every key so far
            q_pos = torch.arange(start, start + T, device=device)
            mask = torch.arange(start + T, device=device)[None, :] <= q_pos[:, None]  # (T, S)
            return cos, sin, False, mask
        # Rows at different positions: gather RoPE per row, scatter the real tokens' keys, mask per row.
        pos = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
        if attention_mask is None:
            rows, cols = (
                torch.arange(len(self), device=device).repeat_interleave(T),
                torch.arange(T, device=device).repeat(len(self)),
            )
        else:
            rows, cols = attention_mask.bool().nonzero(as_tuple=True)
        end = max(n + m for n, m in zip(self.lengths, n_new, strict=True))
        self._step = _CacheStep(n_new, None, end, rows, cols, pos[rows, cols])
        mask = torch.arange(end, device=device)[None, None, :] <= pos[:, :, None]  # (B, T, S)
        rope_pos = pos.clamp(max=rope_cos.shape[0] - 1)  # a right pad may lie past seq_len; it is never read
        return (
            rope_cos[rope_pos][:, None],
            rope_sin[rope_pos][:, None],
            False,
            mask[:, None],
        )  # (B, 1, T, D), (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new k, v (B, K, T, D); return the keys and values to attend to (B, K, S', D)."""
        s = self._step
        keys, values = self.keys[layer], self.values[layer]  # (B, K, S, D)
        if s.start is not None:
            keys[:, :, s.start : s.end] = k
            values[:, :, s.start : s.end] = v
            if s.start == 0:
                return k, v
        else:
            keys[s.rows, :, s.slots] = k[s.rows, :, s.cols]  # (N, K, D): one entry per real token
            values[s.rows, :, s.slots] = v[s.rows, :, s.cols]
        return keys[:, :, : s.end], values[:, :, : s.end]

    def advance(self) -> None:
        """The forward is done: every row now holds its new tokens."""
        self.lengths = [n + m for n, m in zip(self.lengths, self._step.n_new, strict=True)]
        self._step = None


@dataclass
class _CacheStep:
    n_new: list[int]  # real tokens per row in this forward
    start: int | None  # the shared position of every row, or None when rows differ
    end: int  # keys [0, end) are read
    rows: torch.Tensor | None = None  # (N,) per real token: its row, its column in the input, its cache slot
    cols: torch.Tensor | None = None
    slots: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_proj = nn.Linear(args.d_model, args.n_head * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.d_model, args.n_kv_head * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.d_model, args.n_kv_head * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_head * args.head_dim, args.d_model, bias=False)
        self.dropout = args.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        causal: bool,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D): every key of the row so far
            # SDPA groups the query heads itself: no copy of the whole cache per step.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head
            )  # (B, H, T, D)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if self.n_kv_head != self.n_head:
            # Query head h uses kv head h // (H/K), HF's repeat_kv order.
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.up_proj = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.down_proj = nn.Linear(args.d_ff, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; the unit FSDP wraps."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.d_model, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.d_model, args.norm_eps)
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
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, causal, mask, cache, layer))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


# ---- decoding through the KV cache, without autograd ------------------------------------------------
# A decode step of a small model is mostly the cost of calling torch, not of arithmetic: the modules'
# forward above makes about 75 torch calls per layer (and 14 module calls). Reading the same weights
# with q, k, v stacked into one matrix and gate, up into another, RoPE applied to q and k at once,
# and RMSNorm as one fused call makes about 30, with the same results (tests/test_generate.py). Used
# by _cached_hidden_states when no gradient is wanted and every layer is the plain one (a LoRA
# adapter being trained wraps its layers: they then go through their modules).


def _plain_layers(net: nn.Module) -> bool:
    """Every layer is the plain one, unhooked (looked at once per KV cache: peft may wrap layers
    between two generations). ``net._lean_decode = False`` sends decoding through the modules (tests)."""
    plain = (nn.Linear, nn.Dropout, RMSNorm, Attention, MLP, Block)
    return net.__dict__.get("_lean_decode", True) and all(
        type(m) in plain and not (m._forward_hooks or m._forward_pre_hooks)
        for layer in net.layers for m in layer.modules()
    )


def _stacked(layer: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's q, k, v weights as one matrix and gate, up as another, rebuilt when they change."""
    a, m = layer.self_attn, layer.mlp
    parts = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight, m.up_proj.weight)
    key = tuple((p.data_ptr(), p._version) for p in parts)  # an optimizer step bumps _version
    cached = layer.__dict__.get("_stacked")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat(parts[:3]), torch.cat(parts[3:]))
        layer.__dict__["_stacked"] = cached
    return cached[1], cached[2]


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
        qkv_w, gate_up_w = _stacked(layer)
        qkv = F.linear(_rms_norm(x, layer.input_layernorm), qkv_w).view(B, T, H + 2 * K, D).transpose(1, 2)
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
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cos_sin(args.seq_len, args.head_dim, args.rope_theta)
        # Not persistent: derived from args, so they never enter the state dict or the export.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer).
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.args.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

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
        cos = self.rope_cos[:T].to(self.embed_tokens.weight.dtype)
        sin = self.rope_sin[:T].to(self.embed_tokens.weight.dtype)
        x = self.embed_tokens(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, causal, mask)
        return self.norm(x)

    def _cached_hidden_states(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        if not self.causal:
            raise ValueError("only a decoder reads incrementally through a KV cache")
        dtype = self.embed_tokens.weight.dtype
        cos, sin, causal, mask = cache.begin(idx.shape[1], attention_mask, self.rope_cos, self.rope_sin)
        cos, sin = cos.to(dtype), sin.to(dtype)
        x = self.embed_tokens(idx)  # (B, T, C)
        if cache.plain_layers is None:
            cache.plain_layers = _plain_layers(self)
        if not torch.is_grad_enabled() and cache.plain_layers:
            x = _decode_layers(self, x, cos, sin, causal, mask, cache)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, causal, mask, cache, i)
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
        logits = self.lm_head(self.hidden_states(idx, attention_mask, cache, document_ids))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100
            )
        return logits, loss


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


def build_model(args: ModelArgs) -> nn.Module:
    """The network ``args`` describe: a Llama-style Decoder or Encoder, or a BERT encoder."""
    if args.arch == "bert":
        from lm.bert import BertEncoder  # lm.bert builds on this module's ModelArgs

        return BertEncoder(args)
    if args.arch != "llama":
        raise ValueError(f"unknown model arch {args.arch!r}: llama or bert")
    return {"decoder": Decoder, "encoder": Encoder}[args.kind](args)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(args: ModelArgs) -> float:
    """Training FLOPs per token: 6 N for the matmul weights + 12 L C T for attention (PaLM, app. B)."""
    attn = args.d_model * (args.n_head + 2 * args.n_kv_head) * args.head_dim + args.d_model * args.d_model
    mlp = 3 * args.d_model * args.d_ff
    n_matmul = args.n_layer * (attn + mlp) + args.d_model * args.vocab_size  # the output projection
    return 6.0 * n_matmul + 12.0 * args.n_layer * args.d_model * args.seq_len


# ---- Hugging Face Llama layout ---------------------------------------------------------------
# Our name (regex) -> HF LlamaForCausalLM name. Everything but lm_head lives under "model.".
LLAMA_NAME_MAP: list[tuple[str, str]] = [
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^(embed_tokens\.weight|norm\.weight|layers\..*)$", r"model.\1"),
]


def to_llama_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A Decoder's weights under HF LlamaForCausalLM names (tied lm_head included, as HF expects)."""
    if isinstance(model, SequenceClassifier):
        model = model.backbone
    if not isinstance(model, Decoder):
        raise TypeError("only a Decoder maps onto the Llama layout")
    out = {}
    for name, t in model.state_dict().items():
        for pattern, repl in LLAMA_NAME_MAP:
            if re.match(pattern, name):
                out[re.sub(pattern, repl, name)] = t
                break
        else:
            raise KeyError(f"no Llama name for parameter {name}")
    return out


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


# ---- save / load ----------------------------------------------------------------------------
MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (args, kind, classes, ``extra``) atomically.
    ``state``: the weights to write, when the module in memory does not hold them whole (FSDP)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, SequenceClassifier):
        meta = {"kind": "classifier", "backbone_kind": model.args.kind, "num_classes": model.num_classes}
    else:
        meta = {"kind": model.args.kind}
    meta["args"] = asdict(model.args)
    meta.update(extra or {})
    # safetensors refuses shared tensors: drop the tied lm_head, load_model re-ties it.
    state = {k: v.detach().cpu().contiguous() for k, v in (state or model.state_dict()).items()}
    if model.args.tie_embeddings:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    atomic_write(out_dir / MODEL_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write(out_dir / MODEL_JSON, json.dumps(meta, indent=2, sort_keys=True))
    return out_dir / MODEL_WEIGHTS


def read_model_json(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a model folder written by lm.model.save_model")
    return json.loads(path.read_text())


def load_model(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network described by ``model.json`` and load ``model.safetensors``; eval mode."""
    from safetensors.torch import load_file

    meta = read_model_json(model_dir)
    args = ModelArgs.from_dict(meta["args"])
    model: nn.Module = build_model(args)
    if meta["kind"] == "classifier":
        model = SequenceClassifier(model, int(meta["num_classes"]))
    state = load_file(str(Path(model_dir) / MODEL_WEIGHTS), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (args.tie_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: weights do not fit model.json (missing {missing}, unexpected {unexpected})"
        )
    model.meta = meta  # the ids, label names ... that save_model's caller put in extra
    return model.to(map_location).eval()
