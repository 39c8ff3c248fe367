"""Text generation with a decoder: sampling parameters, a batch that decodes through a KV cache, and
one-shot ``generate``.

Layers, lowest first:
- ``lm.generation.kv_cache.KVCache`` and ``Decoder.forward(idx, attention_mask, cache=...)``: read more tokens per row;
- :func:`prefill` / :func:`decode_step`: next-token logits for prompts / for one new token per row;
- :func:`sample_next`: the next token per row (repetition penalty, temperature, top-k, top-p);
- :class:`GenerationBatch`: rows that join (``add``) and leave (done, ``cancel``) between steps, each
  with its own :class:`SamplingParams`, stop strings and end-of-text ids: what a continuously
  batching server drives;
- :func:`generate` / :func:`generate_text`: a list of prompts in, a list of :class:`Generation` out.

Prompts longer than the model's ``seq_len - max_new_tokens`` keep their last tokens (the left is
cut, as a chat client drops the oldest turns); ``Generation.prompt_tokens`` counts what was kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lm.generation.kv_cache import KVCache
from lm.models.transformer import _Transformer


class TextTokenizer(Protocol):
    """What generation needs of a tokenizer (``tokenizers.Tokenizer`` has it)."""

    def decode(self, ids: list[int]) -> str: ...


MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is continued."""

    max_new_tokens: int = 64
    # 0 = greedy (argmax); otherwise logits are divided by it before sampling. Below MIN_TEMPERATURE the
    # distribution is its argmax to float precision (and dividing would overflow): greedy too.
    temperature: float = 1.0
    # Sample among the k most likely tokens only; 0 or None = all.
    top_k: int | None = None
    # Nucleus sampling (Holtzman et al. 2020): the fewest most-likely tokens holding this much probability.
    top_p: float = 1.0
    # CTRL's penalty (Keskar et al. 2019): the logit of a token already in the prompt or the output is
    # divided by it when positive, multiplied when negative; 1 = off, ~1.2 is the paper's choice.
    repetition_penalty: float = 1.0
    # Strings that end the text, checked on the decoded output (needs a tokenizer); not included.
    stop: Sequence[str] = ()
    # Seeds the one torch.Generator of a call to generate(): the same seed and prompts give the same text.
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class Generation:
    """One prompt's continuation."""

    ids: list[int]  # the new tokens, without the end-of-text token or the tokens a stop string began in
    text: str  # ids decoded (with a tokenizer), cut before the stop string; "" without a tokenizer
    finish_reason: Literal["stop", "length"]  # stop: end-of-text token or stop string; length: max_new_tokens
    prompt_tokens: int  # prompt tokens read (after cutting a prompt that was too long)
    completion_tokens: int  # tokens the model produced, the end-of-text or stop-string ones included


# ---- logits -------------------------------------------------------------------------------------


def _decoder(model: nn.Module) -> _Transformer:
    if not (isinstance(model, _Transformer) and model.causal):
        raise ValueError(f"generation needs a decoder (lm.models.transformer.Decoder), not {type(model).__name__}")
    return model


def _right_padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids (B, T) padded with 0, attention mask (B, T) bool, lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max())
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return idx.to(device), mask.to(device), lengths.to(device)


@torch.inference_mode()
def last_logits(model: nn.Module, seqs: list[list[int]], cache: KVCache | None = None) -> torch.Tensor:
    """Next-token logits (B, V) float32 after each row of ``seqs`` (right-padded into one forward).
    With a ``cache``, the rows continue the cache's rows and are stored in it; without, the rows are
    whole sequences and the network reads them from the start (no cache: the baseline)."""
    net = _decoder(model)
    device = net.embed_tokens.weight.device
    idx, mask, lengths = _right_padded(seqs, device)
    uniform = bool(mask.all())  # no padding: a causal model needs no mask at all
    h = net.hidden_states(idx, None if uniform else mask, cache)  # (B, T, C)
    last = h[:, -1] if uniform else h[torch.arange(len(seqs), device=device), lengths - 1]
    return net.logits(last).float()


def prefill(
    model: nn.Module, prompts: list[list[int]], max_len: int | None = None
) -> tuple[KVCache, torch.Tensor]:
    """Read prompts (of any lengths) into a new cache of ``max_len`` positions (default seq_len):
    -> the cache and the next-token logits (B, V)."""
    net = _decoder(model)
    w = net.embed_tokens.weight
    cache = KVCache.empty(net.args, len(prompts), max_len, device=w.device, dtype=w.dtype)
    return cache, last_logits(net, prompts, cache)


@torch.inference_mode()
def decode_step(model: nn.Module, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per row (B,) to the cache -> the next-token logits (B, V) float32."""
    net = _decoder(model)
    h = net.hidden_states(tokens[:, None], None, cache)  # (B, 1, C)
    return net.logits(h[:, 0]).float()


# ---- sampling -----------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): logits (B, V) of the tokens ``seen`` (B, V) bool divided by
    ``penalty`` (B, 1) where positive, multiplied where negative: both make the token less likely."""
    penalty = penalty.clamp(1e-6, 1e6)  # beyond these a logit overflows float32 (inf - inf is nan)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with -inf outside each row's k most likely tokens (top_k (B,), 0 = all) and then
    outside its nucleus (top_p (B,)): the fewest tokens whose probability sums to top_p; the most
    likely token always stays. Applied in this order, as Hugging Face's logits warpers are."""
    V = logits.size(-1)
    ordered, order = logits.sort(-1, descending=True)  # (B, V)
    k = torch.where(top_k > 0, top_k, V)
    ordered = ordered.masked_fill(torch.arange(V, device=logits.device)[None, :] >= k[:, None], -float("inf"))
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the more likely tokens
    p = torch.where(top_p < 1, top_p, float("inf"))  # top_p = 1: float rounding must not cut the tail
    drop = before >= p[:, None]
    drop[:, 0] = False  # a top_p too small for float32 (it rounds to 0) keeps the likeliest token too
    ordered = ordered.masked_fill(drop, -float("inf"))
    return torch.full_like(logits, -float("inf")).scatter(-1, order, ordered)


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token per row (B,) from logits (B, V), each row by its own params. ``seen`` (B, V) bool:
    the tokens each row has read, for the repetition penalty."""
    device = logits.device

    def column(values: list) -> torch.Tensor:
        return torch.tensor(values, device=device)

    logits = logits.float()
    penalties = [p.repetition_penalty for p in params]
    if seen is not None and any(x != 1.0 for x in penalties):
        logits = apply_repetition_penalty(logits, seen, column(penalties)[:, None])
    greedy = [p.temperature < MIN_TEMPERATURE for p in params]
    if all(greedy):
        return logits.argmax(-1)
    logits = logits / column([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)])[:, None]
    if any(p.top_k or p.top_p < 1 for p in params):
        logits = filter_top_k_top_p(
            logits, column([p.top_k or 0 for p in params]), column([float(p.top_p) for p in params])
        )
    sampled = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
    if any(greedy):
        sampled = torch.where(column(greedy), logits.argmax(-1), sampled)
    return sampled


# ---- a batch of sequences -----------------------------------------------------------------------


@dataclass
class _Row:
    handle: int
    params: SamplingParams
    context: list[int]  # prompt + every token produced (what the no-cache path reads again)
    prompt_tokens: int
    generator: torch.Generator | None = None  # the row's own (a seeded request); None: the batch's
    ids: list[int] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut it
    produced: int = 0
    finish_reason: str | None = None


class GenerationBatch:
    """Sequences decoded together, one new token per row a step. Rows join (:meth:`add`, which reads
    their prompts) and leave (finished, or :meth:`cancel`) between steps; each has its own
    :class:`SamplingParams`. Rows are independent: a row's tokens never depend on the others
    (except through the shared random generator when sampling).

        batch = GenerationBatch(model, tokenizer=tok, eos_ids=[eot])
        handles = batch.add(prompts, SamplingParams(max_new_tokens=50))
        while batch:
            for handle, gen in batch.step().items(): ...
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: TextTokenizer | None = None,
        eos_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
        max_len: int | None = None,
        use_cache: bool = True,
    ):
        self.model = _decoder(model)
        self.tokenizer, self.eos_ids, self.generator = tokenizer, frozenset(eos_ids), generator
        self.max_len = max_len or self.model.args.seq_len  # positions per row, prompt + output
        self.use_cache = use_cache
        self.device = self.model.embed_tokens.weight.device
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None  # views of the first B rows of the buffers below
        # Every row's keys and values live in these (L, capacity, K, max_len, D) buffers, allocated
        # once per size the batch reaches: a joining row is read straight into a free row, a leaving
        # one's place is filled by moving the rows after it. A server whose rows come and go every
        # few steps then neither copies the whole cache nor allocates a new one each time (which
        # cost time and let the process's memory wander by ~15% under glibc's allocator).
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of every row
        self.seen: torch.Tensor | None = None  # (B, V) bool: the tokens each row has read
        self._handles = itertools.count()

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None
    ) -> list[int]:
        """Read these prompts (cut on the left to ``max_len - max_new_tokens`` tokens) -> one handle each.
        ``generator``: these rows sample with it instead of the batch's (a server seeds one per request,
        so a seeded request's text does not depend on the requests it is batched with)."""
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings are matched on decoded text: pass a tokenizer")
        room = self.max_len - params.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in {self.max_len} positions"
            )
        if any(not p for p in prompts):
            raise ValueError("a prompt is empty: give at least one token (e.g. the end-of-text id)")
        kept = [list(p[-room:]) for p in prompts]
        rows = [_Row(next(self._handles), params, k, len(k), generator) for k in kept]
        if self.use_cache:
            logits = last_logits(self.model, kept, self._free_rows(len(kept)))
            self.cache = self._cache_view(len(self.rows) + len(kept), (self.cache.lengths if self.cache else []) +
                                          [len(k) for k in kept])
        else:
            logits = last_logits(self.model, kept)
        seen = torch.zeros(len(kept), self.model.args.vocab_size, dtype=torch.bool, device=self.device)
        for b, k in enumerate(kept):
            seen[b, k] = True
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.seen = seen if self.seen is None else torch.cat([self.seen, seen])
        self.rows += rows
        return [r.handle for r in rows]

    @torch.inference_mode()
    def step(self) -> dict[int, Generation]:
        """One new token for every row -> the rows that finished with it (they leave the batch)."""
        if not self.rows:
            return {}
        tokens = self._sample()  # (B,)
        self.seen[torch.arange(len(self.rows), device=self.device), tokens] = True
        for row, token in zip(self.rows, tokens.tolist(), strict=True):
            self._push(row, token)
        done = {r.handle: self._result(r) for r in self.rows if r.finish_reason}
        if done:
            keep = [i for i, r in enumerate(self.rows) if not r.finish_reason]
            self._keep(keep)
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=self.device)]
        if self.rows:
            if self.use_cache:
                self.logits = decode_step(self.model, self.cache, tokens)
            else:
                self.logits = last_logits(self.model, [r.context for r in self.rows])
        return done

    def _sample(self) -> torch.Tensor:
        """The next token of every row (B,): rows that bring their own generator sample with it."""
        params = [r.params for r in self.rows]
        if all(r.generator is None for r in self.rows):
            return sample_next(self.logits, params, self.generator, self.seen)
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
        groups: dict[int, list[int]] = {}  # id(generator) -> rows
        for i, r in enumerate(self.rows):
            groups.setdefault(id(r.generator), []).append(i)
        for rows in groups.values():
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            generator = self.rows[rows[0]].generator or self.generator
            tokens[idx] = sample_next(self.logits[idx], [params[i] for i in rows], generator, self.seen[idx])
        return tokens

    @torch.inference_mode()
    def cancel(self, handles: Sequence[int]) -> dict[int, Generation]:
        """Take rows out of the batch -> what they produced so far (finish_reason "length")."""
        gone = set(handles)
        out = {}
        for r in self.rows:
            if r.handle in gone:
                r.finish_reason = "length"
                out[r.handle] = self._result(r)
        self._keep([i for i, r in enumerate(self.rows) if r.handle not in gone])
        return out

    def _keep(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.logits, self.seen = self.logits[idx], self.seen[idx]
        if self.cache is not None:
            lengths = self.cache.lengths
            for i, r in enumerate(keep):  # keep is increasing: row r moves down to i, never over a kept row
                if r != i:
                    self._keys[:, i].copy_(self._keys[:, r])
                    self._values[:, i].copy_(self._values[:, r])
            self.cache = self._cache_view(len(keep), [lengths[r] for r in keep])

    def _cache_view(self, rows: int, lengths: list[int]) -> KVCache:
        return KVCache(self._keys[:, :rows], self._values[:, :rows], lengths)

    def _free_rows(self, n: int) -> KVCache:
        """An empty cache of n rows in the buffers' first free rows (the buffers grow, doubling, when full)."""
        used = len(self.rows)
        if self._keys is None or used + n > self._keys.shape[1]:
            w = self.model.embed_tokens.weight
            grown = KVCache.empty(self.model.args, max(used + n, 2 * used), self.max_len, device=w.device, dtype=w.dtype)
            if used:
                grown.keys[:, :used] = self._keys[:, :used]
                grown.values[:, :used] = self._values[:, :used]
            self._keys, self._values = grown.keys, grown.values
        # A free row may hold a finished row's keys: never read, as a row reads only its own positions.
        return KVCache(self._keys[:, used : used + n], self._values[:, used : used + n], [0] * n)

    def _push(self, row: _Row, token: int) -> None:
        row.produced += 1
        row.context.append(token)
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.ids.append(token)
        if row.params.stop:
            text = self.tokenizer.decode(row.ids)
            hits = [i for i in (text.find(s) for s in row.params.stop) if i >= 0]
            if hits:
                cut = min(hits)
                # Drop the tokens the stop string began in: what is left decodes to text before it.
                while row.ids and len(self.tokenizer.decode(row.ids)) > cut:
                    row.ids.pop()
                row.text, row.finish_reason = text[:cut], "stop"
                return
        if row.produced >= row.params.max_new_tokens:
            row.finish_reason = "length"

    def _result(self, row: _Row) -> Generation:
        text = row.text
        if text is None:
            text = self.tokenizer.decode(row.ids) if self.tokenizer is not None else ""
        return Generation(row.ids, text, row.finish_reason, row.prompt_tokens, row.produced)


# ---- one call -----------------------------------------------------------------------------------


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_ids: Sequence[int] = (),
    tokenizer: TextTokenizer | None = None,
    use_cache: bool = True,
) -> list[Generation]:
    """Continue every prompt (token ids) -> one :class:`Generation` each, in order. The prompts are
    decoded as one batch; greedy results equal those of one prompt at a time."""
    if not prompts:
        return []
    net = _decoder(model)
    seq_len = net.args.seq_len
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=net.embed_tokens.weight.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
    # The cache holds what the longest (kept) prompt needs, not the model's whole seq_len.
    longest = max(min(len(p), seq_len - params.max_new_tokens) for p in prompts)
    max_len = min(seq_len, max(longest, 1) + params.max_new_tokens)
    batch = GenerationBatch(
        net, tokenizer=tokenizer, eos_ids=eos_ids, generator=generator, max_len=max_len, use_cache=use_cache
    )
    handles = batch.add(prompts, params)
    out: dict[int, Generation] = {}
    while batch:
        out.update(batch.step())
    return [out[h] for h in handles]


def generate_text(
    model: nn.Module, tokenizer: Any, prompts: list[str], params: SamplingParams, eos_ids: Sequence[int] = ()
) -> list[Generation]:
    """:func:`generate` on texts, with a ``tokenizers.Tokenizer`` (its ``encode(text).ids``)."""
    ids = [tokenizer.encode(p).ids for p in prompts]
    return generate(model, ids, params, eos_ids=eos_ids, tokenizer=tokenizer)


# ---- a model folder -----------------------------------------------------------------------------


