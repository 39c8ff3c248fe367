"""The KV cache: the keys (RoPE applied) and values a decoder has computed, kept for incremental
decoding of rows at different positions (continuous batching in the server, batched generation).

Plain torch, no network: the networks of :mod:`lm.models.transformer` read and write it inside their
forward (``begin``, ``update``, ``advance``), the sampler (:mod:`lm.generation.sampling`) and the
server's engine make, select and join caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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
        # Whether the model's layers are all plain ones (lm.models.transformer._plain_layers), decided at the
        # cache's first forward: walking the modules on every decode step cost ~2% of a step.
        self.plain_layers: bool | None = None

    @classmethod
    def empty(
        cls, args: Any, batch: int, max_len: int | None = None, *, device=None, dtype=torch.float32
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
            self._step = _CacheStep(n_new, start, start + T, T=T)
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
        rope_pos = pos.clamp(max=rope_cos.shape[0] - 1)  # a right pad may lie past seq_len; it is never read
        self._step = _CacheStep(n_new, None, end, rows, cols, pos[rows, cols], T=T, pos=pos, rope_pos=rope_pos)
        mask = torch.arange(end, device=device)[None, None, :] <= pos[:, :, None]  # (B, T, S)
        return (
            rope_cos[rope_pos][:, None],
            rope_sin[rope_pos][:, None],
            False,
            mask[:, None],
        )  # (B, 1, T, D), (B, 1, T, S)

    def rope_at(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of another RoPE table (S_max, R) at this forward's positions, shaped as ``begin``'s."""
        s = self._step
        if s.start is not None:
            return table[s.start : s.start + s.T]  # (T, R)
        return table[s.rope_pos][:, None]  # (B, 1, T, R)

    def window_mask(self, window: int) -> torch.Tensor:
        """The mask of a sliding-window layer in this forward: a query at position q reads the keys
        at q - window < k <= q (Hugging Face's convention). (T, S) or (B, 1, T, S), True = read."""
        s = self._step
        device = self.keys.device
        if s.start is not None:
            q = torch.arange(s.start, s.start + s.T, device=device)[:, None]  # (T, 1)
            k = torch.arange(s.T if s.start == 0 else s.end, device=device)[None, :]
            return (k <= q) & (q - k < window)
        q = s.pos[:, :, None]  # (B, T, 1)
        k = torch.arange(s.end, device=device)
        return ((k <= q) & (q - k < window))[:, None]

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
    T: int = 0  # tokens per row in this forward
    pos: torch.Tensor | None = None  # (B, T) each token's position, when rows differ
    rope_pos: torch.Tensor | None = None  # the same, clamped into the RoPE tables
