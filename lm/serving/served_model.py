"""The model a server serves: loading it (an export folder, a Hugging Face folder or a registered
``models:/NAME@ALIAS``), the slot that says which one new requests go to, and the thread that
follows a registry alias.

A swap never cuts a request: the slot points new requests at the new model's engine and closes the
old one, which finishes the requests (streams included) it already has and then lets its thread
and model go.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.config import display_uri
from lm.errors import ConfigError, LmforgeError
from lm.text.chat import ChatFormat, Message

if TYPE_CHECKING:  # the engines import torch: a command that fails on its arguments should not wait for it
    from lm.serving.engine import ClassifierEngine, GenerationEngine

log = logging.getLogger("lmforge.serve")

REGISTERED = re.compile(r"models:/([A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@([A-Za-z0-9][A-Za-z0-9._-]{0,127})|/(\d+))")


def registered_name(source: str) -> tuple[str, str | None] | None:
    """models:/NAME@ALIAS -> (NAME, ALIAS); models:/NAME/VERSION -> (NAME, None); a path -> None."""
    if not source.startswith("models:/"):
        return None
    m = REGISTERED.fullmatch(source)
    if not m:
        raise ConfigError(f"--model {source!r}: a registered model is models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group(1), m.group(2)


@dataclass(eq=False)
class ServedModel:
    """One loaded model version and the engine that serves it."""

    name: str  # the id clients pass as "model"
    version: str | None  # the registry's version; None for a folder
    source: str  # the folder or models:/ URI it was loaded from
    engine: GenerationEngine | ClassifierEngine
    kind: str  # decoder | classifier
    seq_len: int
    tokenizer: Any = None
    chat: ChatFormat | None = None  # decoders with a chat template
    system_prompt: str | None = None  # sft: what every training conversation began with
    start_ids: list[int] = field(default_factory=list)  # an empty completion prompt starts here
    labels: list[str] = field(default_factory=list)  # classifiers
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def served_as(self) -> str:
        """What responses name as their ``model``: the id with the version served (``NAME/3``)."""
        return f"{self.name}/{self.version}" if self.version else self.name

    @property
    def version_label(self) -> str:
        """The version in metrics' labels ("local" for a folder)."""
        return self.version or "local"

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The tokens the model reads for a conversation, up to the start of the assistant's reply."""
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.chat.encode(messages, add_generation_prompt=True)[0]

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids or list(self.start_ids)


def load_folder(
    folder: Path, *, name: str, version: str | None, source: str, max_batch_size: int,
    on_step: Callable[[str | None, int, bool], None] | None = None, in_process: bool = False,
    on_died: Callable[[], None] | None = None,
) -> ServedModel:
    """A served model from an lmforge export folder (a decoder, sft, or classifier) or a decoder's
    folder (lmforge's or Hugging Face's), its engine started: a decoder's in a process of its own
    (``lm.serving.process``) unless ``in_process``; a classifier's in a thread of this process.
    ``on_died()``: the engine's process died without being asked to stop."""
    import json

    from lm.models.folder import MODEL_JSON
    from lm.models.load_for_generation import load_for_generation
    from lm.serving.engine import ClassifierEngine, GenerationEngine

    meta_path = folder / MODEL_JSON
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    def step(generated: bool) -> Callable[[int], None] | None:
        return None if on_step is None else (lambda rows: on_step(version, rows, generated))

    if meta.get("kind") == "classifier":
        from lm.finetune.classify import Predictor

        predictor = Predictor(folder)
        engine = ClassifierEngine(predictor.probabilities, on_step=step(False), name=f"lmforge-classifier-{version or 'local'}")
        served = ServedModel(name, version, source, engine, "classifier", predictor.seq_len, predictor.tokenizer,
                             labels=predictor.labels)
    elif in_process:
        from lm.serving.process import stop_ids

        gm = load_for_generation(folder)
        eos_ids = stop_ids(gm)
        engine = GenerationEngine(gm.model, gm.tokenizer, eos_ids, max_batch_size=max_batch_size,
                                  on_step=step(True), name=f"lmforge-engine-{version or 'local'}")
        served = _decoder(name, version, source, engine, gm.model.args.seq_len, gm.tokenizer, eos_ids,
                          gm.chat_template, gm.special_tokens, getattr(gm.model, "meta", {}) or {})
    else:
        from tokenizers import Tokenizer

        from lm.serving.process import EngineProcess

        engine = EngineProcess(folder, max_batch_size=max_batch_size, on_step=step(True), on_died=on_died,
                               name=f"lmforge-engine-{version or 'local'}")
        info = engine.start()  # the model is loaded in the engine's process only
        served = _decoder(name, version, source, engine, info.seq_len, Tokenizer.from_str(info.tokenizer_json),
                          info.eos_ids, info.chat_template, info.special_tokens, info.meta)
        return served
    engine.start()
    return served


def _decoder(name: str, version: str | None, source: str, engine: Any, seq_len: int, tokenizer: Any,
             eos_ids: list[int], chat_template: str | None, special_tokens: dict[str, str],
             meta: dict[str, Any]) -> ServedModel:
    chat = None
    if chat_template:
        chat = ChatFormat(tokenizer, {"chat_template": chat_template, **special_tokens})
    eot = meta.get("eot_id")
    return ServedModel(
        name, version, source, engine, "decoder", seq_len, tokenizer, chat,
        system_prompt=meta.get("system_prompt"),
        start_ids=[int(eot)] if eot is not None else eos_ids[:1],
    )


def load_served(
    source: str, *, tracking_uri: str | None, name: str | None = None, max_batch_size: int = 32,
    on_step: Callable[[str | None, int, bool], None] | None = None, in_process: bool = False,
    on_died: Callable[[], None] | None = None,
) -> ServedModel:
    """Load what ``--model`` names: a folder, or a registered model (downloaded to a temporary folder,
    which is removed once the model is in memory)."""
    from lm.tracking.registry import download_registered

    registered = registered_name(source)
    if registered is None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise LmforgeError(f"--model {source}: no such folder (give an export folder or models:/NAME@ALIAS)")
        # As vLLM names a folder it serves: by the path it was given.
        return load_folder(folder, name=name or source, version=None, source=source,
                           max_batch_size=max_batch_size, on_step=on_step, in_process=in_process, on_died=on_died)
    uri = tracking_uri or "sqlite:///mlflow.db"
    work = Path(tempfile.mkdtemp(prefix="lmforge-serve-"))
    try:
        try:
            folder, version = download_registered(source, uri, work)
        except ConfigError as e:  # worded for model.init_from, where the pipeline meets the same spec
            # The registry's message names the tracking URI: without its password on a terminal.
            raise ConfigError(display_uri(str(e).replace(f"model.init_from={source!r}", f"--model {source}"))) from None
        return load_folder(folder, name=name or registered[0], version=version, source=source,
                           max_batch_size=max_batch_size, on_step=on_step, in_process=in_process, on_died=on_died)
    finally:
        # Weights and tokenizer are in memory now (a file mapped by safetensors stays readable on Linux).
        shutil.rmtree(work, ignore_errors=True)


class ModelSlot:
    """Which model new requests go to; the models replaced but still finishing requests."""

    def __init__(self, model: ServedModel, on_swap: Callable[[ServedModel | None, ServedModel], None] | None = None):
        self._lock = threading.Lock()
        self.current = model
        self._retired: list[ServedModel] = []
        self.on_swap = on_swap
        if on_swap is not None:
            on_swap(None, model)

    def swap(self, new: ServedModel) -> ServedModel:
        """New requests go to ``new`` from now on; the old model finishes its requests, then stops."""
        with self._lock:
            old, self.current = self.current, new
            self._retired = [m for m in self._retired if not m.engine.exited] + [old]
        old.engine.close()
        if self.on_swap is not None:
            self.on_swap(old, new)
        return old

    def models(self) -> list[ServedModel]:
        """The current model and those still finishing requests."""
        with self._lock:
            return [self.current, *(m for m in self._retired if not m.engine.exited)]

    def close(self) -> None:
        for m in self.models():
            m.engine.close()


class RegistryFollower:
    """Polls the registry every ``poll_s`` seconds; when ``source``'s alias points at another version,
    loads it in this thread and swaps it in. A version that fails to load is logged and the old one
    keeps serving (it is tried again at the next poll)."""

    def __init__(self, slot: ModelSlot, source: str, tracking_uri: str, poll_s: float,
                 load: Callable[[], ServedModel], on_failure: Callable[[], None] | None = None):
        self.slot, self.source, self.uri, self.poll_s = slot, source, tracking_uri, poll_s
        self.load, self.on_failure = load, on_failure
        self._stop = threading.Event()
        self.failed_polls = 0  # in a row: the registry is said to be unreachable once, not every poll
        self._thread = threading.Thread(target=self._run, name="lmforge-registry-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> bool:
        """One poll: swap if the alias moved -> whether it swapped."""
        from lm.tracking.registry import resolve_registered

        try:
            version = resolve_registered(self.source, self.uri)["version"]
        except Exception as e:  # the registry is down, the alias was removed ...: keep serving
            if not self.failed_polls:
                log.warning("lmforge serve: cannot read %s from the registry (%s); still serving version %s, "
                            "and asking again every %g s (said again when it answers)", self.source,
                            _one_line(e), self.slot.current.version, self.poll_s)
            self.failed_polls += 1
            return False
        if self.failed_polls:
            log.info("lmforge serve: the registry answers again after %d failed polls; %s is version %s",
                     self.failed_polls, self.source, version)
            self.failed_polls = 0
        if version == self.slot.current.version:
            return False
        log.info("lmforge serve: %s now points at version %s; loading it", self.source, version)
        try:
            new = self.load()
        except Exception as e:
            if self.on_failure is not None:
                self.on_failure()
            log.warning("lmforge serve: version %s of %s failed to load (%s); still serving version %s",
                        version, self.source, _one_line(e), self.slot.current.version)
            return False
        if new.version == self.slot.current.version:  # the alias moved back meanwhile
            new.engine.close()
            return False
        old = self.slot.swap(new)
        log.info("lmforge serve: serving %s version %s (version %s finishes its %d running requests)",
                 new.name, new.version, old.version, old.engine.running + old.engine.queue_depth)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()


def _one_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return display_uri(f"{type(e).__name__}: {text[0] if text else ''}")
