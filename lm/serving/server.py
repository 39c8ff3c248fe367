"""``lmforge serve``: bind the port, load the model, follow the registry alias, run uvicorn.

The port is bound before the model loads, so a busy port is said in one line at once, and the
bound socket is handed to uvicorn (no window for another process to take it)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from lm.errors import LmforgeError
from lm.serving.protocol import Limits
from lm.serving.served_model import ModelSlot, RegistryFollower, ServedModel, load_served, registered_name

log = logging.getLogger("lmforge.serve")


@dataclass(frozen=True)
class ServeOptions:
    model: str  # an export folder, a decoder folder, or models:/NAME@ALIAS | models:/NAME/VERSION
    host: str = "127.0.0.1"
    port: int = 8000
    limits: Limits = Limits()
    poll_seconds: float = 30.0  # how often a models:/NAME@ALIAS server asks the registry where the alias is
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    served_model_name: str | None = None  # None: the registered name, or the folder as given (as vLLM does)
    max_batch_size: int = 32  # rows decoded together
    # A decoder's engine runs in a process of its own (lm.serving.process); True: in a thread of this
    # one (one process to debug; a stream is then about half as fast on a small model).
    engine_in_process: bool = False
    # How long an idle keep-alive connection is held open. Longer than a client's own pool expiry
    # (httpx, and so the openai client: 5 s), so that it is the client that drops an idle
    # connection: a server closing it while a client sends its next request on it gives that request
    # a reset connection (it did, about once in 10,000 requests, with uvicorn's 5 s).
    keep_alive_s: int = 75
    log_level: str = "info"


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, or an error that says the port is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LmforgeError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = "is in use (another server? choose one with --port)" if e.errno == 98 else f"cannot be bound: {e.strerror}"
        raise LmforgeError(f"port {port} on {host} {why}") from None
    return sock


class Server:
    """A model loaded and its app, on a bound socket; :meth:`run` serves until stopped."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self._stopping = False
        self.uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        # What the command line got wrong is said before torch and the web stack are imported (seconds).
        registered = registered_name(opts.model)
        if registered is None and not Path(opts.model).expanduser().is_dir():
            raise LmforgeError(f"--model {opts.model}: no such folder (give an export folder or models:/NAME@ALIAS)")
        if registered is not None and self.uri.startswith("sqlite:///") and not Path(self.uri[10:]).is_file():
            # MLflow would create an empty store there and then find no model in it.
            raise LmforgeError(f"--model {opts.model}: there is no MLflow store at {self.uri} (give --tracking-uri "
                               "or set MLFLOW_TRACKING_URI)")
        self.sock = bind(opts.host, opts.port)

        import uvicorn

        from lm.serving.app import create_app
        from lm.serving.metrics import ServingMetrics

        self.metrics = ServingMetrics()
        self.port = self.sock.getsockname()[1]
        try:
            first = self._load()
        except BaseException:
            self.sock.close()
            raise
        self.slot = ModelSlot(first, on_swap=self._swapped)
        self.follower = None
        if registered is not None and registered[1] is not None:  # an alias moves; a version does not
            self.follower = RegistryFollower(self.slot, opts.model, self.uri, opts.poll_seconds, self._load,
                                             on_failure=self.metrics.load_failures.inc)
        self.app = create_app(self.slot, opts.limits, self.metrics)
        config = uvicorn.Config(
            self.app, log_level=opts.log_level, access_log=opts.log_level == "debug",
            timeout_keep_alive=opts.keep_alive_s, timeout_graceful_shutdown=min(30, int(opts.limits.timeout_s)) or 1,
        )
        self.uvicorn = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host = self.opts.host if ":" not in self.opts.host else f"[{self.opts.host}]"
        return f"http://{host}:{self.port}"

    def _load(self) -> ServedModel:
        return load_served(
            self.opts.model, tracking_uri=self.uri, name=self.opts.served_model_name,
            max_batch_size=self.opts.max_batch_size, in_process=self.opts.engine_in_process,
            on_died=self._engine_died, on_step=lambda version, rows, generated: self.metrics.step(version or "local", rows, generated),
        )

    def _engine_died(self) -> None:
        """An engine process died (killed, out of memory): load the model again beside the server,
        and swap it in; its requests already ended with an error, /health says 503 meanwhile."""
        threading.Thread(target=self._restart_engine, name="lmforge-engine-restart", daemon=True).start()

    def _restart_engine(self) -> None:
        import time

        delay = 1.0
        while not self._stopping and not self.uvicorn.should_exit:
            try:
                new = self._load()
            except Exception as e:  # noqa: BLE001 - e.g. the registry is unreachable: try again
                log.warning("lmforge serve: reloading the model after its engine died failed (%s); again in %g s",
                            e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            if self._stopping or self.uvicorn.should_exit:
                new.engine.close()
                return
            self.slot.swap(new)
            log.warning("lmforge serve: the engine process died; %s version %s is served again by a new one",
                        new.name, new.version or "local")
            return

    def _swapped(self, old: ServedModel | None, new: ServedModel) -> None:
        before = None if old is None else (old.name, old.version_label, old.source)
        self.metrics.serving(new.name, new.version_label, new.source, before)
        if old is not None:
            self.metrics.swaps.inc()

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (or :meth:`stop`), then let the engines finish and stop."""
        served = self.slot.current
        log.info("lmforge serve: %s (version %s, a %s) on %s; OpenAI API at %s/v1", served.name,
                 served.version or "local", served.kind, self.url, self.url)
        if self.follower is not None:
            self.follower.start()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self._stopping = True
            if self.follower is not None:
                self.follower.stop()
            self.slot.close()
            self.sock.close()

    def start(self) -> threading.Thread:
        """:meth:`run` in a thread (tests, embedding); returns once it answers."""
        import time

        thread = threading.Thread(target=self.run, name="lmforge-serve", daemon=True)
        thread.start()
        while not self.uvicorn.started:
            if not thread.is_alive():
                raise LmforgeError("the server stopped while starting")
            time.sleep(0.01)
        return thread

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def serve(opts: ServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    Server(opts).run()
