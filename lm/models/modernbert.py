"""ModernBERT (Warner et al. 2024) as Hugging Face's ``ModernBertForMaskedLM`` computes it, so that a
checkpoint saved by ``save_pretrained`` runs here unchanged (``lm.models.hf.load_hf``).

What sets it apart from BERT: no position embeddings but RoPE, with one base for global layers
(``rope_theta``) and another for local ones (``rope_local_theta``); every layer but each
``global_attn_every_n_layers``-th attends within a window around the query only; pre-norm
blocks with bias-free LayerNorms (layer 0 has no attention norm: the embeddings are normed just
before it), a GeGLU MLP, a final norm, and an MLM head (dense, act, norm) before the output
projection tied to the word embeddings, with a bias.

HF fuses q, k, v into one ``Wqkv`` and the MLP's two inputs into one ``Wi``; they are split here
(``lm.models.encoders`` splits the checkpoint's tensors), so the layers carry the names LoRA
targets elsewhere in lmforge: ``q_proj`` ... ``o_proj``, ``gate_proj`` (the half that goes through
the activation, HF's ``input``), ``up_proj`` (HF's ``gate``), ``down_proj``. Products are the same.

The interface is the ``Encoder``'s: ``args``, ``causal``, ``hidden_states``, ``forward -> (logits,
loss)``, ``lm_head``, so ``SequenceClassifier``, ``save_model`` and ``load_model`` take it as they
are. Settings ModelArgs has no field for (head bias and activation, output bias) are read from
``args.hf_config`` with HF's defaults.

Shapes: B batch, T sequence length, C d_model, H heads, D head dim, F d_ff, V vocabulary.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lm.models.bert import init_encoder_weights
from lm.models.transformer import ModelArgs, apply_rope, rope_cos_sin, token_loss

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf), HF's "gelu"
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # HF's "gelu_new", "gelu_pytorch_tanh"
    "relu": F.relu,
    "silu": F.silu,
}
# HF's activation names (hidden_activation, classifier_activation) -> ours.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}
NORMS = ("layer", "layer_nobias")  # ModelArgs.norm: LayerNorm with or without a bias (HF's norm_bias)


def _norm(args: ModelArgs) -> nn.LayerNorm:
    return nn.LayerNorm(args.d_model, eps=args.norm_eps, bias=args.norm == "layer")


class ModernBertLayer(nn.Module):
    """Pre-norm block: x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        C, F_ = args.d_model, args.d_ff
        self.n_head, self.head_dim = args.n_head, args.head_dim
        # Layer 0 reads the embeddings, which were just normed.
        self.attn_norm = _norm(args) if layer else nn.Identity()
        self.q_proj = nn.Linear(C, C, bias=args.attn_bias)
        self.k_proj = nn.Linear(C, C, bias=args.attn_bias)
        self.v_proj = nn.Linear(C, C, bias=args.attn_bias)
        self.o_proj = nn.Linear(C, C, bias=args.attn_bias)
        self.mlp_norm = _norm(args)
        self.gate_proj = nn.Linear(C, F_, bias=args.mlp_bias)
        self.up_proj = nn.Linear(C, F_, bias=args.mlp_bias)
        self.down_proj = nn.Linear(F_, C, bias=args.mlp_bias)
        self.act = ACTIVATIONS[args.ffn_act]
        self.dropout = args.dropout
        self.drop = nn.Dropout(args.dropout)
        self.sliding = args.layer_is_sliding(layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        B, T, C = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        x = x + self.drop(self.o_proj(y.transpose(1, 2).reshape(B, T, C)))
        h = self.mlp_norm(x)
        # HF drops out the MLP's hidden activations (mlp_dropout), not its output.
        return x + self.down_proj(self.drop(self.act(self.gate_proj(h)) * self.up_proj(h)))  # (B, T, C)


class ModernBertEncoder(nn.Module):
    """Bidirectional masked language model in ModernBERT's layout; targets -100 where not masked."""

    causal = False

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.arch != "modernbert" or args.kind != "encoder":
            raise ValueError(
                f"ModernBertEncoder needs arch='modernbert', kind='encoder' (got {args.arch!r}, {args.kind!r})"
            )
        if args.n_kv_head != args.n_head or args.head_dim * args.n_head != args.d_model:
            raise ValueError(
                "ModernBertEncoder: n_kv_head must equal n_head and n_head * head_dim equal d_model"
            )
        if args.ffn_act not in ACTIVATIONS or args.norm not in NORMS:
            raise ValueError(
                f"ModernBertEncoder: ffn_act {args.ffn_act!r} must be one of {', '.join(ACTIVATIONS)} "
                f"and norm {args.norm!r} one of {', '.join(NORMS)}"
            )
        hf = args.hf_config or {}
        head_act = HF_ACTIVATIONS.get(hf.get("classifier_activation", "gelu"))
        if head_act is None:
            raise ValueError(
                f"ModernBertEncoder: classifier_activation {hf['classifier_activation']!r} is not one of "
                f"{', '.join(HF_ACTIVATIONS)}"
            )
        self.args = args
        C = args.d_model
        self.embed_tokens = nn.Embedding(args.vocab_size, C)
        self.embed_norm = _norm(args)
        self.drop = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(ModernBertLayer(args, i) for i in range(args.n_layer))
        self.norm = _norm(args)
        # The MLM head (HF's "head" + "decoder"): transform, then the output projection.
        self.head_dense = nn.Linear(C, C, bias=bool(hf.get("classifier_bias", False)))
        self.head_act = ACTIVATIONS[head_act]
        self.head_norm = _norm(args)
        self.lm_head = nn.Linear(C, args.vocab_size, bias=bool(hf.get("decoder_bias", True)))
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not persistent: derived from args, so they never enter the state dict. (T, D) each.
        local_theta = args.rope_local_theta or args.rope_theta
        for name, theta in (("global", args.rope_theta), ("local", local_theta)):
            cos, sin = rope_cos_sin(args.seq_len, args.head_dim, theta)
            self.register_buffer(f"rope_{name}_cos", cos, persistent=False)
            self.register_buffer(f"rope_{name}_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # HF truncates at 2 std; a fresh model here only matters for tests.
        init_encoder_weights(self)

    def _masks(
        self, T: int, attention_mask: torch.Tensor | None, device
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(global mask (B, 1, 1, T) or None, local mask (B or 1, 1, T, T)); True = may attend.

        A local query at i reads the keys j with |i - j| < sliding_window: HF's window of
        ``local_attention`` tokens centred on the query (|i - j| <= local_attention // 2)."""
        pos = torch.arange(T, device=device)
        near = (pos[:, None] - pos[None, :]).abs() < self.args.sliding_window  # (T, T)
        if attention_mask is None:
            return None, near[None, None]
        real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        # A pad query far from every real token would see no key at all, and SDPA's kernels give NaN
        # for such a row, which 0-weights do not stop from reaching real tokens through v: each query
        # also sees itself. Real queries never see a pad, so their outputs are HF's.
        local = (real | torch.eye(T, dtype=torch.bool, device=device)) & near  # (B, 1, T, T)
        return real, local

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> final-norm hidden states (B, T, C). attention_mask (B, T), True = real token
        (right padding: positions are 0..T-1 in every row, as HF numbers them)."""
        B, T = idx.shape
        if T > self.args.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len={self.args.seq_len}")
        full_mask, local_mask = self._masks(T, attention_mask, idx.device)
        dtype = self.embed_tokens.weight.dtype
        rope = {
            False: (self.rope_global_cos[:T].to(dtype), self.rope_global_sin[:T].to(dtype)),
            True: (self.rope_local_cos[:T].to(dtype), self.rope_local_sin[:T].to(dtype)),
        }
        x = self.drop(self.embed_norm(self.embed_tokens(idx)))  # (B, T, C)
        for layer in self.layers:
            x = layer(x, *rope[layer.sliding], local_mask if layer.sliding else full_mask)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> MLM logits (B, T, V); loss is mean cross-entropy over targets != -100."""
        h = self.head_norm(self.head_act(self.head_dense(self.hidden_states(idx, attention_mask))))
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = token_loss(logits, targets)
        return logits, loss
