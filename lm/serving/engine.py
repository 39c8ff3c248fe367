"""The serving engine: one thread owns a model and serves every request given to it, batched.

A :class:`GenerationEngine` drives one :class:`lm.generation.sampling.GenerationBatch` (continuous batching,
as Orca, Yu et al. 2022, and vLLM do): between two decode steps, the requests that arrived join the
running batch (their prompts read in one prefill per group of equal sampling settings) and the rows
that finished or were cancelled leave it, so a short request never waits for a long one. After
each step every running request gets the text its new token completed (:class:`TextStream`: never
half a UTF-8 character, never the start of one of its stop strings); a finished one gets the rest
and its counts.

A :class:`ClassifierEngine` does the same for a classifier: the requests waiting when it is free
are scored in one ``probabilities`` call.

The engine knows nothing of HTTP or asyncio: a request brings an ``emit`` callable, which the
engine thread calls with each :data:`Event` (the app hands them to its event loop). ``close``
stops taking requests and lets the thread finish the ones it has, which is how a server swaps
models without cutting a stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lm.generation.sampling import GenerationBatch, SamplingParams

log = logging.getLogger(__name__)


# ---- what a request hears ------------------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """New text of a running request (may be "" for the first token, which is still news)."""

    text: str
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    """The end of a request: the text not sent yet, the whole text, why it ended, token counts."""

    text: str
    full_text: str
    finish_reason: str  # stop (end of text or a stop string) | length (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Classified:
    probabilities: np.ndarray  # (N, classes), one row per input text


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Classified | Failed
Emit = Callable[[Event], None]


class EngineClosed(RuntimeError):
    """The engine was closed (its model is being replaced): submit to the current one."""


@dataclass(eq=False)
class Request:
    """A handle on one submitted request."""

    emit: Emit
    cancelled: bool = False  # set by the app's thread, read by the engine's: a plain flag is enough

    def fail(self, message: str) -> None:
        self.emit(Failed(message))


@dataclass(eq=False)
class TextRequest(Request):
    prompt: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(eq=False)
class ClassifyRequest(Request):
    texts: list[str] = field(default_factory=list)


# ---- incremental detokenisation ------------------------------------------------------------------


class TextStream:
    """The text of a growing token sequence, released piece by piece.

    Decoding one token alone is wrong twice over: a byte-level BPE token may hold part of a UTF-8
    character (decoded alone it is U+FFFD), and some decoders change a token's text by what precedes
    it. So, as Hugging Face's text-generation-inference does, the tokens since the last complete
    piece are decoded with a few tokens of left context, and the new text is released only when it
    does not end in U+FFFD. The last ``hold`` characters are kept back while the request runs: they
    could be the start of a stop string, which the client must never see.
    """

    def __init__(self, tokenizer: Any, hold: int = 0):
        self.tokenizer = tokenizer
        self.hold = hold
        self.prefix = 0  # ids[prefix:read] decode to text already counted (the left context)
        self.read = 0
        self.text = ""  # every complete character so far
        self.sent = 0  # characters of text released

    def push(self, ids: Sequence[int]) -> str:
        """``ids``: every token so far -> the text to release now (maybe "")."""
        before = self.tokenizer.decode(list(ids[self.prefix : self.read]))
        now = self.tokenizer.decode(list(ids[self.prefix :]))
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(ids)
        upto = len(self.text) - self.hold
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece

    def finish(self, final: str) -> str:
        """The whole text at the end (cut before a stop string) -> what is left to release."""
        if not final.startswith(self.text[: self.sent]):
            # Never expected (released text is always a prefix of the final text); say so, send the rest.
            log.warning("streamed text is not a prefix of the final text; the stream may differ from it")
        return final[self.sent :]


# ---- the engines ---------------------------------------------------------------------------------


class _EngineThread:
    """One thread, an inbox, and the close/drain protocol shared by both engines."""

    def __init__(self, name: str):
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closing = False
        self._exited = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _submit(self, request: Request) -> Request:
        with self._lock:
            if self._closing:
                raise EngineClosed("this engine no longer takes requests")
            self._inbox.put(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop working on ``request`` (its client went away or its time ran out); no event follows."""
        request.cancelled = True

    def close(self) -> None:
        """Take no new requests; the thread ends once it has finished those it has."""
        with self._lock:
            self._closing = True

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def exited(self) -> bool:
        """The thread has finished (closed and drained, or failed)."""
        return self._exited

    def _take(self, block: bool) -> list[Request]:
        """What arrived (waiting a little for the first if ``block``), cancelled ones dropped."""
        got = []
        try:
            if block:
                got.append(self._inbox.get(timeout=0.05))
            while True:
                got.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return [r for r in got if not r.cancelled]

    def _idle_and_closed(self) -> bool:
        with self._lock:
            return self._closing and self._inbox.empty() and not self._busy()

    def _main(self) -> None:
        try:
            while not self._idle_and_closed():
                self._turn()
        except Exception as e:  # a bug or an out-of-memory: every waiting client hears it, the thread ends
            log.exception("serving engine failed")
            self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
            with self._lock:
                self._closing = True
            while True:
                try:
                    self._inbox.get_nowait().fail("the engine failed")
                except queue.Empty:
                    break
        finally:
            self._exited = True

    # Each engine: one unit of work (admit, step, publish); whether it holds requests; fail them all.
    def _turn(self) -> None:
        raise NotImplementedError

    def _busy(self) -> bool:
        raise NotImplementedError

    def _fail_all(self, message: str) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class _Live:
    request: TextRequest
    stream: TextStream
    tokens: int = 0  # tokens produced when last published


class GenerationEngine(_EngineThread):
    """Continuous batching of text requests over one decoder's KV cache (see the module docstring).

    ``max_batch_size``: rows decoded together; more requests wait in the queue (the app bounds how
    many are in flight). ``on_step(rows)``: called after each decode step (one new token per row).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        eos_ids: Sequence[int],
        *,
        max_batch_size: int = 32,
        seed: int | None = None,
        on_step: Callable[[int], None] | None = None,
        name: str = "lmforge-engine",
    ):
        super().__init__(name)
        generator = torch.Generator(device=model.embed_tokens.weight.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        self.batch = GenerationBatch(model, tokenizer=tokenizer, eos_ids=eos_ids, generator=generator)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.on_step = on_step
        self._waiting: deque[TextRequest] = deque()
        self._live: dict[int, _Live] = {}  # batch handle -> request

    def submit(self, prompt: list[int], params: SamplingParams, emit: Emit) -> TextRequest:
        """Queue ``prompt`` (token ids, fitting the model's context with ``params.max_new_tokens``)."""
        return self._submit(TextRequest(emit, prompt=list(prompt), params=params))

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._waiting) + self._inbox.qsize()

    @property
    def running(self) -> int:
        """Rows in the batch."""
        return len(self.batch)

    def _busy(self) -> bool:
        return bool(self.batch) or bool(self._waiting)

    def _turn(self) -> None:
        self._waiting.extend(self._take(block=not self._busy()))
        self._drop_cancelled()
        self._admit()
        if self.batch:
            self._step()

    def _drop_cancelled(self) -> None:
        gone = [h for h, live in self._live.items() if live.request.cancelled]
        if gone:
            self.batch.cancel(gone)
            for h in gone:
                del self._live[h]
        if any(r.cancelled for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _admit(self) -> None:
        """Read the prompts of waiting requests into the batch, as many as it has room for."""
        room = self.max_batch_size - len(self.batch)
        joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        # One prefill per group of requests with the same settings (add takes one SamplingParams);
        # a seeded request samples with its own generator, so it is read alone.
        groups: dict[Any, list[TextRequest]] = {}
        for r in joining:
            key = (r.params, id(r)) if r.params.seed is not None and r.params.temperature > 0 else (r.params,)
            groups.setdefault(key, []).append(r)
        for members in groups.values():
            params = members[0].params
            generator = None
            if params.seed is not None and params.temperature > 0:
                generator = torch.Generator(device=self.batch.device).manual_seed(params.seed)
            try:
                handles = self.batch.add([r.prompt for r in members], params, generator)
            except ValueError as e:  # the app checks prompts first; a request it let through fails alone
                for r in members:
                    r.fail(str(e))
                continue
            hold = max((len(s) for s in params.stop), default=1) - 1
            for h, r in zip(handles, members, strict=True):
                self._live[h] = _Live(r, TextStream(self.tokenizer, hold))

    def _step(self) -> None:
        rows = len(self.batch)
        done = self.batch.step()
        for h, gen in done.items():
            live = self._live.pop(h)
            rest = live.stream.finish(gen.text)
            live.request.emit(Finished(rest, gen.text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens))
        # The rows still running: publish what their new token completed.
        for row in self.batch.rows:
            live = self._live[row.handle]
            if row.produced == live.tokens:
                continue
            first = live.tokens == 0
            live.tokens = row.produced
            piece = live.stream.push(row.ids)
            if piece or first:
                live.request.emit(Delta(piece, row.produced))
        if self.on_step is not None:
            self.on_step(rows)

    def _fail_all(self, message: str) -> None:
        for live in self._live.values():
            live.request.fail(message)
        for r in self._waiting:
            r.fail(message)
        self._live.clear()
        self._waiting.clear()


class ClassifierEngine(_EngineThread):
    """Batches classification requests: the texts of every request waiting when the thread is free
    go through one ``predict_proba(texts)`` call (up to ``max_batch_texts`` texts, whole requests).
    ``on_step(texts)``: called after each call."""

    def __init__(
        self,
        predict_proba: Callable[[list[str]], np.ndarray],
        *,
        max_batch_texts: int = 256,
        on_step: Callable[[int], None] | None = None,
        name: str = "lmforge-classifier",
    ):
        super().__init__(name)
        self.predict_proba = predict_proba
        self.max_batch_texts = max_batch_texts
        self.on_step = on_step
        self._waiting: deque[ClassifyRequest] = deque()

    def submit(self, texts: list[str], emit: Emit) -> ClassifyRequest:
        return self._submit(ClassifyRequest(emit, texts=list(texts)))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    @property
    def running(self) -> int:
        return 0

    def _busy(self) -> bool:
        return bool(self._waiting)

    def _turn(self) -> None:
        self._waiting.extend(self._take(block=not self._waiting))
        group: list[ClassifyRequest] = []
        n = 0
        while self._waiting and (not group or n + len(self._waiting[0].texts) <= self.max_batch_texts):
            r = self._waiting.popleft()
            if not r.cancelled:
                group.append(r)
                n += len(r.texts)
        if not group:
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            probs = self.predict_proba([t for r in group for t in r.texts])
        log.debug("classified %d texts of %d requests in %.3f s", n, len(group), time.perf_counter() - t0)
        start = 0
        for r in group:
            r.emit(Classified(probs[start : start + len(r.texts)]))
            start += len(r.texts)
        if self.on_step is not None:
            self.on_step(n)

    def _fail_all(self, message: str) -> None:
        for r in self._waiting:
            r.fail(message)
        self._waiting.clear()
