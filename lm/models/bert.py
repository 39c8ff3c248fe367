"""BERT (Devlin et al. 2019) as Hugging Face's ``BertForMaskedLM`` computes it, so that a BERT
checkpoint saved by ``save_pretrained`` runs here unchanged (``lm.models.hf.load_hf``). RoBERTa (Liu et
al. 2019) and DistilBERT (Sanh et al. 2019) are the same network with two switches
(``lm.models.encoders`` reads them): RoBERTa's learned positions start at row
``position_offset`` (``padding_idx + 1``) and it has one token type; DistilBERT has no token-type
embedding (``type_vocab_size=0``).

Unlike our Llama-style ``Encoder``: learned absolute position and token-type (segment) embeddings
summed with the word embeddings and layer-normed, post-LN blocks (LayerNorm after each residual
add) with biases everywhere, a GELU MLP, and an MLM head (dense + GELU + LayerNorm, then the
output projection tied to the word embeddings, with its own bias). The interface is the
``Encoder``'s: ``args``, ``causal``, ``hidden_states``, ``forward -> (logits, loss)``, ``lm_head``,
so ``SequenceClassifier``, ``save_model`` and ``load_model`` take it as they are.

Shapes: B batch, T sequence length, C d_model, H heads, D head dim, F d_ff, V vocabulary.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lm.models.transformer import ModelArgs, token_loss

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf), HF's "gelu"
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # HF's "gelu_new", "gelu_pytorch_tanh"
    "relu": F.relu,
}


def init_encoder_weights(module: nn.Module) -> None:
    """BERT's init, which ModernBERT shares here: N(0, 0.02) weights, zero biases, LayerNorm = identity."""
    for name, p in module.named_parameters():
        if "norm" in name:
            nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, 0.02)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        C = args.d_model
        self.n_head, self.head_dim = args.n_head, args.head_dim
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.o_proj = nn.Linear(C, C)
        self.attn_norm = nn.LayerNorm(C, eps=args.norm_eps)
        self.up_proj = nn.Linear(C, args.d_ff)
        self.down_proj = nn.Linear(args.d_ff, C)
        self.mlp_norm = nn.LayerNorm(C, eps=args.norm_eps)
        self.act = ACTIVATIONS[args.ffn_act]
        self.dropout = args.dropout
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        x = self.attn_norm(x + self.drop(self.o_proj(y.transpose(1, 2).reshape(B, T, C))))
        return self.mlp_norm(x + self.drop(self.down_proj(self.act(self.up_proj(x)))))  # (B, T, C)


class BertEncoder(nn.Module):
    """Bidirectional masked language model in BERT's layout; targets -100 where not masked."""

    causal = False

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.arch != "bert" or args.kind != "encoder":
            raise ValueError(
                f"BertEncoder needs arch='bert', kind='encoder' (got {args.arch!r}, {args.kind!r})"
            )
        if args.n_kv_head != args.n_head or args.head_dim * args.n_head != args.d_model:
            raise ValueError("BertEncoder: n_kv_head must equal n_head and n_head * head_dim equal d_model")
        if args.ffn_act not in ACTIVATIONS:
            raise ValueError(f"BertEncoder: ffn_act {args.ffn_act!r} is not one of {', '.join(ACTIVATIONS)}")
        self.args = args
        C = args.d_model
        self.embed_tokens = nn.Embedding(args.vocab_size, C)
        # RoBERTa's rows 0..padding_idx are never read by a real token (fairseq's layout), but the
        # checkpoint holds them: the table keeps them so that its rows line up with HF's.
        self.embed_positions = nn.Embedding(args.position_offset + args.seq_len, C)
        # DistilBERT has no segments: no table at all, so its state dict matches the checkpoint's.
        self.embed_types = nn.Embedding(args.type_vocab_size, C) if args.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(C, eps=args.norm_eps)
        self.drop = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(BertLayer(args) for _ in range(args.n_layer))
        # The MLM head ("cls.predictions" in HF): transform, then the output projection.
        self.head_dense = nn.Linear(C, C)
        self.head_norm = nn.LayerNorm(C, eps=args.norm_eps)
        self.act = ACTIVATIONS[args.ffn_act]
        self.lm_head = nn.Linear(C, args.vocab_size)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_encoder_weights(self)

    def hidden_states(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> last layer's hidden states (B, T, C). attention_mask (B, T), True = real token;
        token_type_ids (B, T) default all 0 (one segment).

        Positions are 0..T-1 (+ position_offset) in every row: with right padding a real token's
        position is what HF gives it (RoBERTa counts non-pad tokens, the same thing there)."""
        B, T = idx.shape
        if T > self.args.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len={self.args.seq_len}")
        positions = torch.arange(T, device=idx.device) + self.args.position_offset
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.embed_types is not None:  # summed in HF's order: tokens, types, positions
            x = x + self.embed_types(torch.zeros_like(idx) if token_type_ids is None else token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but this encoder has no token types (type_vocab_size=0)")
        x = x + self.embed_positions(positions)
        x = self.drop(self.embed_norm(x))
        # (B, 1, 1, T): every query may look at the real keys only.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> MLM logits (B, T, V); loss is mean cross-entropy over targets != -100."""
        h = self.head_norm(self.act(self.head_dense(self.hidden_states(idx, attention_mask))))
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = token_loss(logits, targets)
        return logits, loss


# ---- Hugging Face BERT layout ----------------------------------------------------------------
# HF name (regex, "bert." prefix removed) -> ours. Names that match nothing here and IGNORED
# below are an error.
BERT_NAME_MAP: list[tuple[str, str]] = [
    (r"^embeddings\.word_embeddings\.", "embed_tokens."),
    (r"^embeddings\.position_embeddings\.", "embed_positions."),
    (r"^embeddings\.token_type_embeddings\.", "embed_types."),
    (r"^embeddings\.LayerNorm\.", "embed_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.o_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.up_proj."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.down_proj."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.mlp_norm."),
    (r"^cls\.predictions\.transform\.dense\.", "head_dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "head_norm."),
    (r"^cls\.predictions\.bias$", "lm_head.bias"),
    (r"^cls\.predictions\.decoder\.weight$", "lm_head.weight"),
]
# Weights of heads we do not have (pooler, next-sentence prediction), HF's position-id buffer, and
# the decoder bias that HF ties to cls.predictions.bias.
IGNORED = re.compile(
    r"^(pooler\.|cls\.seq_relationship\.|embeddings\.position_ids$|cls\.predictions\.decoder\.bias$)"
)


def from_bert_state_dict(hf_state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """HF ``BertForMaskedLM`` / ``BertModel`` weights under our names (what BertEncoder loads)."""
    out = {}
    for name, t in hf_state.items():
        name = name.removeprefix("bert.")
        # Checkpoints from the TensorFlow era name LayerNorm parameters gamma and beta.
        name = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        )
        if IGNORED.match(name) or (tie_embeddings and name == "cls.predictions.decoder.weight"):
            continue
        for pattern, repl in BERT_NAME_MAP:
            if re.match(pattern, name):
                out[re.sub(pattern, repl, name)] = t
                break
        else:
            raise KeyError(f"no BertEncoder name for HF parameter {name}")
    return out
