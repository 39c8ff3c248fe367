"""The tracking store as lmforge talks to it: its URI checked before any work
(:func:`check_tracking_uri`), an MLflow client for it (:func:`mlflow_client`: a new sqlite store is
created once, by one process at a time) and its failures as one :class:`~lm.errors.TrackingError`
line (:func:`user_errors`). The modules of ``lm.tracking`` that call MLflow get their client here.

Imports no MLflow at module import: the training child reaches this through its metric sender.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from lm.config import Config, display_uri
from lm.errors import TrackingError
from lm.fileio import exclusive_lock


def user_errors(fn):
    """MLflow's and the database driver's exceptions reach the user as one TrackingError line. A
    server that did not answer (after MLflow's own retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT) is named; later calls to it in this process ask its /health first
    (5 s) instead of spending those retries again (a failed stage's run, then the pipeline's, end)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        uri = _uri_of(args)
        if uri in _UNREACHABLE:
            check_tracking_uri(uri)  # raises at once while it is still away
            _UNREACHABLE.discard(uri)
        try:
            return fn(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as e:
            from mlflow.exceptions import MlflowException
            from sqlalchemy.exc import SQLAlchemyError

            if not isinstance(e, MlflowException | SQLAlchemyError | OSError):
                raise
            if uri and _gave_up(e):
                _UNREACHABLE.add(uri)
                raise TrackingError(
                    f"MLflow tracking server {display_uri(uri)} did not answer in {fn.__name__.lstrip('_')} "
                    f"({short_error(e)}), after MLflow's retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
                    "MLFLOW_HTTP_REQUEST_TIMEOUT)"
                ) from e
            raise TrackingError(f"MLflow tracking failed in {fn.__name__.lstrip('_')}: {short_error(e)}") from e

    return wrapper


_UNREACHABLE: set[str] = set()  # tracking servers that did not answer this process


def _uri_of(args: tuple) -> str | None:
    first = args[0] if args else None
    if isinstance(first, Config):
        return first.tracking_uri()
    return first if isinstance(first, str) and "://" in first else None


def _gave_up(e: BaseException) -> bool:
    """Whether MLflow gave up on a server that did not answer (refused, timed out), as opposed to one
    that answered with an error."""
    import requests

    seen = e
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def short_error(e: BaseException) -> str:
    """An MLflow error in a few words: 'connection refused' rather than urllib3's whole retry story."""
    text = getattr(e, "message", None) or str(e)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("too many 5", "server errors")):
        if needle in text:
            return short
    return text.splitlines()[0][:500] if text else type(e).__name__


_READY: set[str] = set()  # sqlite stores this process has seen created


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri`` (explicit: never the fluent API's process-global run)."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    # MLflow creates (and migrates) a new sqlite store on first use, and two processes doing it at
    # once collide ("duplicate column name": two pipeline runs started together on a new store).
    # One process at a time, under a lock file beside the database.
    db = Path(uri[len("sqlite:///") :])
    with exclusive_lock(db.with_name(db.name + ".lock")):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    _READY.add(uri)
    return client


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before any work, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        # user:password@ in the URI (MLflow's basic auth) is a header for urllib, not part of the host.
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        probe = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health")
        if parts.username is not None:
            import base64

            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            probe.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(probe, timeout=5) as r:  # noqa: S310 (user's own server)
                r.read(64)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            raise TrackingError(
                f"MLflow tracking server {display_uri(uri)} is unreachable ({getattr(e, 'reason', e)}). "
                "Start it (`mlflow server`), fix tracking.uri / MLFLOW_TRACKING_URI, "
                "or leave both unset to use the local sqlite:///mlflow.db."
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.is_dir():
            raise TrackingError(
                f"tracking.uri {uri}: folder {parent} does not exist; create it or point "
                "tracking.uri elsewhere"
            )
        if not os.access(parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(f"tracking.uri {uri}: {db if db.exists() else parent} is not writable")
        if db.exists() and not db.is_file():
            raise TrackingError(f"tracking.uri {uri}: {db} is a folder, not an SQLite database file")
        if db.is_file() and db.stat().st_size and db.read_bytes()[:16] != b"SQLite format 3\x00":
            raise TrackingError(f"tracking.uri {uri}: {db} is not an SQLite database; point tracking.uri elsewhere")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"tracking.uri {display_uri(uri)!r}: MLflow 3 no longer accepts plain file stores; use "
            "sqlite:///path/to/mlflow.db or http://host:5000"
        )
    elif uri.split("://")[0].split("+")[0] not in ("postgresql", "mysql", "mssql", "databricks"):
        raise TrackingError(
            f"tracking.uri {display_uri(uri)!r}: unknown scheme; use sqlite:///path/to/mlflow.db, http(s)://host:5000 "
            "or a database URI (postgresql://...)"
        )


def known_unreachable(uri: str) -> bool:
    """Whether the server at ``uri`` did not answer a call of this process (and has not since)."""
    return uri in _UNREACHABLE
