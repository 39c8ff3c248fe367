"""The generation engine in a process of its own.

A decode step of a small model is a hundred or so short torch calls, and each one lets go of the
GIL and takes it back. In the server's process the event loop wants the GIL at the same moments
(every streamed token is an HTTP write), so the two threads hand it to each other all the time:
measured with ``benchmarks/serve.py``, one stream through HTTP ran at half the engine's own speed.
:class:`EngineProcess` runs the :class:`~lm.serving.engine.GenerationEngine` (model, KV cache,
detokenisation, stop strings) in a child process and keeps in the server only what HTTP needs:
the child sends, once per decode step, one message holding every event of that step.

It has the engine's interface (``submit``, ``cancel``, ``close``, ``join``, ``closed``,
``exited``, ``queue_depth``, ``running``), so the app and the model slot do not know which one they
hold. The child is started with ``spawn`` (forking a process whose OpenMP threads already ran can
hang the child) and ends when it is closed and has finished its requests, or when the server's
process goes away (its command pipe closes).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm.errors import LmforgeError
from lm.generation.sampling import SamplingParams
from lm.serving.engine import (
    Delta,
    EngineClosed,
    Event,
    Failed,
    Finished,
    GenerationEngine,
    Request,
    TextRequest,
)

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # loading a big model from a slow disk; a child that dies is noticed at once


@dataclass
class DecoderInfo:
    """What the server's process needs to know of the decoder the child loaded."""

    seq_len: int
    eos_ids: list[int]
    tokenizer_json: str
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # model.json: eot_id, system_prompt ...


def stop_ids(gm: Any) -> list[int]:
    """The ids that end a generation: the model's end-of-text ids and its chat template's turn ends."""
    from lm.text.chat import ChatFormat

    chat = None
    if gm.chat_template:
        chat = ChatFormat(gm.tokenizer, {"chat_template": gm.chat_template, **gm.special_tokens})
    return sorted({*gm.eos_ids, *(chat.stop_ids if chat else ())})


@dataclass(eq=False)
class _Job(TextRequest):
    rid: int = -1  # the id the child knows the request by


class EngineProcess:
    """A :class:`~lm.serving.engine.GenerationEngine` in a child process (see the module docstring).

    ``on_step(rows)`` is called in this process after each of the child's decode steps."""

    def __init__(self, folder: str | Path, *, max_batch_size: int = 32, seed: int | None = None,
                 on_step: Callable[[int], None] | None = None, on_died: Callable[[], None] | None = None,
                 name: str = "lmforge-engine"):
        import multiprocessing as mp

        import torch

        ctx = mp.get_context("spawn")
        self._commands_child, self._commands = ctx.Pipe(duplex=False)  # this process writes
        self._events, self._events_child = ctx.Pipe(duplex=False)  # the child writes
        self._proc = ctx.Process(
            target=_child_main,
            # The child decodes with as many threads as this process would have.
            args=(str(folder), max_batch_size, seed, torch.get_num_threads(), self._commands_child,
                  self._events_child),
            name=name, daemon=True,
        )
        self.name = name
        self.on_step = on_step
        self.on_died = on_died  # called (from this object's reader thread) if the child dies unasked
        self._lock = threading.Lock()  # the command pipe and the request tables
        self._jobs: dict[int, TextRequest] = {}
        self._started: set[int] = set()  # requests that heard from the engine (they are in its batch)
        self._ids = itertools.count()
        self._closing = False
        self._exited = False
        self._reader = threading.Thread(target=self._read, name=f"{name}-events", daemon=True)
        self.info: DecoderInfo | None = None

    def start(self) -> DecoderInfo:
        """Start the child and wait until it has loaded the model -> what it found."""
        self._proc.start()
        self._commands_child.close()  # the child's ends: this process keeps none
        self._events_child.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._events.poll(0.1):
            if not self._proc.is_alive():
                raise LmforgeError(f"the engine process for the model stopped while loading it (exit code "
                                   f"{self._proc.exitcode})")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise LmforgeError(f"the engine process did not load the model within {STARTUP_TIMEOUT_S:g} s")
        try:
            kind, payload = self._events.recv()
        except EOFError:
            raise LmforgeError("the engine process stopped while loading the model") from None
        if kind == "failed":
            self._proc.join(timeout=10)
            raise LmforgeError(payload)
        self.info = payload
        self._reader.start()
        return payload

    # ---- the engine's interface -------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> TextRequest:
        with self._lock:
            if self._closing:
                raise EngineClosed("this engine no longer takes requests")
            rid = next(self._ids)
            request = _Job(emit, prompt=list(prompt), params=params, rid=rid)
            self._jobs[rid] = request
            self._send(("submit", rid, request.prompt, params))
        return request

    def cancel(self, request: Request) -> None:
        """Stop working on ``request``; no event follows."""
        request.cancelled = True
        rid = getattr(request, "rid", -1)
        with self._lock:
            if self._jobs.pop(rid, None) is not None:
                self._started.discard(rid)
                self._send(("cancel", rid))

    def close(self) -> None:
        """Take no new requests; the child ends once it has finished those it has."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._send(("close",))

    def join(self, timeout: float | None = None) -> bool:
        self._reader.join(timeout)
        self._proc.join(timeout)
        return self._exited

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def exited(self) -> bool:
        return self._exited

    @property
    def queue_depth(self) -> int:
        """Requests the engine has not started on."""
        return len(self._jobs) - len(self._started)

    @property
    def running(self) -> int:
        return len(self._started)

    # ---- inside ------------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        try:
            self._commands.send(message)
        except (BrokenPipeError, OSError):  # the child is gone: the reader fails what is left
            pass

    def _read(self) -> None:
        """This process's end of the event pipe: hand each event to its request, then count the step."""
        try:
            while True:
                kind, *payload = self._events.recv()
                if kind == "step":
                    rows, events = payload
                    self._deliver(events)
                    if self.on_step is not None:
                        self.on_step(rows)
                elif kind == "events":
                    self._deliver(payload[0])
                elif kind == "exited":
                    break
        except (EOFError, OSError):
            pass
        finally:
            with self._lock:
                died, self._closing = not self._closing, True
                left, self._jobs = list(self._jobs.values()), {}
                self._started.clear()
            for request in left:
                request.fail("the engine stopped")
            self._exited = True
        if died:
            self._proc.join(timeout=10)
            log.error("the engine process of %s stopped (exit code %s)", self.name, self._proc.exitcode)
            if self.on_died is not None:
                self.on_died()

    def _deliver(self, events: Sequence[tuple[int, Event]]) -> None:
        for rid, event in events:
            # Under the lock, emit included (a queue put): a cancel that returned is never followed
            # by an event, even one the child sent before it read the cancel.
            with self._lock:
                request = self._jobs.get(rid)
                if request is None:  # cancelled
                    continue
                if isinstance(event, Finished | Failed):
                    del self._jobs[rid]
                    self._started.discard(rid)
                else:
                    self._started.add(rid)
                request.emit(event)


# ---- the child ------------------------------------------------------------------------------------


def _child_main(folder: str, max_batch_size: int, seed: int | None, threads: int, commands, events) -> None:
    """The engine process: load the model, say what it is, then run the server's commands until it
    closes us or goes away; finish the requests running, and say that this process has exited."""
    _set_up_process(threads)
    send = _sender(events)
    loaded = _load_decoder(folder, send)
    if loaded is None:
        return
    gm, info = loaded
    relay = _Relay(send)
    engine = GenerationEngine(gm.model, gm.tokenizer, info.eos_ids, max_batch_size=max_batch_size, seed=seed,
                              on_step=relay.step, name="lmforge-engine")
    engine.start()
    send(("ready", info))
    try:
        _run_commands(commands, engine, relay)
    finally:
        engine.close()
        engine.join()
        if relay.pending:
            send(("events", relay.pending))
        send(("exited",))


def _set_up_process(threads: int) -> None:
    """Decode with ``threads`` threads, and leave stop signals to the server's process."""
    import torch

    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group, and systemd's stop sends SIGTERM to every process of
    # the service: the server's process decides when this one ends (it closes it, or goes away).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _sender(events) -> Callable[[tuple], None]:
    """send(message) on the event pipe, from either thread; nothing once the server is gone."""
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock, contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server is gone
            events.send(message)

    return send


def _load_decoder(folder: str, send: Callable[[tuple], None]) -> tuple[Any, DecoderInfo] | None:
    """Load the model for generation -> (it, what the server needs to know of it); on failure, send
    why and return None."""
    try:
        from lm.models.load_for_generation import load_for_generation

        gm = load_for_generation(folder)
        info = DecoderInfo(gm.model.args.seq_len, stop_ids(gm), gm.tokenizer.to_str(), gm.chat_template,
                           dict(gm.special_tokens), dict(getattr(gm.model, "meta", {}) or {}))
    except LmforgeError as e:  # said for a person already
        send(("failed", str(e)))
        return None
    except Exception as e:  # noqa: BLE001 - the server's process words it
        send(("failed", f"{folder}: {type(e).__name__}: {e}"))
        return None
    return gm, info


@dataclass
class _Relay:
    """Between the engine and the server's process: the requests the engine has, and their events on
    the way back (a step's deltas and finishes together once the step ends, a failure at once)."""

    send: Callable[[tuple], None]
    pending: list[tuple[int, Event]] = field(default_factory=list)  # this step's events
    jobs: dict[int, TextRequest] = field(default_factory=dict)  # by the server's id

    def emit(self, rid: int, event: Event) -> None:
        if isinstance(event, Delta):
            self.pending.append((rid, event))  # from the engine thread, inside a step
            return
        self.jobs.pop(rid, None)
        if isinstance(event, Finished):
            self.pending.append((rid, event))
        else:
            self.send(("events", [(rid, event)]))

    def step(self, rows: int) -> None:
        batch, self.pending = self.pending, []
        self.send(("step", rows, batch))


def _run_commands(commands, engine: GenerationEngine, relay: _Relay) -> None:
    """Submit and cancel as the server asks, until it says close, goes away, or the engine thread fails."""
    while True:
        if not commands.poll(0.5):
            if engine.exited:  # the engine thread failed (a bug): end, and the server starts another
                return
            continue
        try:
            message = commands.recv()
        except EOFError:  # the server's process is gone: finish what is running, then go
            return
        kind = message[0]
        if kind == "submit":
            rid, prompt, params = message[1:]
            try:
                relay.jobs[rid] = engine.submit(prompt, params, functools.partial(relay.emit, rid))
            except EngineClosed:  # the engine thread failed (it said so to every request it had)
                relay.send(("events", [(rid, Failed("the engine failed"))]))
        elif kind == "cancel":
            job = relay.jobs.pop(message[1], None)
            if job is not None:
                engine.cancel(job)
        elif kind == "close":
            return
