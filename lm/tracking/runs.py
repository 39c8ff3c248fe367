"""Every MLflow run-tracking call of lmforge lives here (the registry lives in ``lm/tracking/registry.py``).

One parent run per pipeline run, one nested child run per stage. Run ids are passed explicitly
(``MlflowClient``, never the fluent API's global "active run"): Prefect runs tasks in threads, and
``MLFLOW_RUN_ID`` in the environment turns nesting into resuming (mlflow/mlflow#15713).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import math
import os
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lm.config import Config, display_uri
from lm.errors import TrackingError
from lm.fileio import atomic_write, exclusive_lock, process_alive
from lm.pipeline.stage import StageResult

log = logging.getLogger(__name__)

# A cached stage's child run repeats its small artifacts (stats, tables, samples), not its weights.
CACHED_ARTIFACT_MAX_BYTES = 5_000_000

def _user_errors(fn):
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
            if uri and _unreachable(e):
                _UNREACHABLE.add(uri)
                raise TrackingError(
                    f"MLflow tracking server {display_uri(uri)} did not answer in {fn.__name__.lstrip('_')} "
                    f"({_first_line(e)}), after MLflow's retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
                    "MLFLOW_HTTP_REQUEST_TIMEOUT)"
                ) from e
            raise TrackingError(f"MLflow tracking failed in {fn.__name__.lstrip('_')}: {_first_line(e)}") from e

    return wrapper


_UNREACHABLE: set[str] = set()  # tracking servers that did not answer this process


def _uri_of(args: tuple) -> str | None:
    first = args[0] if args else None
    if isinstance(first, Config):
        return first.tracking_uri()
    return first if isinstance(first, str) and "://" in first else None


def _unreachable(e: BaseException) -> bool:
    """Whether MLflow gave up on a server that did not answer (refused, timed out), as opposed to one
    that answered with an error."""
    import requests

    seen = e
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(e: BaseException) -> str:
    """An MLflow error in a few words: 'connection refused' rather than urllib3's whole retry story."""
    text = getattr(e, "message", None) or str(e)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("too many 5", "server errors")):
        if needle in text:
            return short
    return text.splitlines()[0][:500] if text else type(e).__name__


_READY: set[str] = set()  # sqlite stores this process has seen created


def _client(uri: str):
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


# MLflow 3's UI opens an experiment on its GenAI overview (traces) unless told it holds model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_VIEW = "workflowType=machine_learning"  # the UI's own switch between its GenAI and model-training views


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            # Beside the database, not in whatever folder the process started in (MLflow's ./mlruns).
            location = (Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created by a concurrent process meanwhile
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND[0] not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def git_commit(root: Path | None = None) -> str | None:
    root = root or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = str(v)[:6000]
    return flat


@_user_errors
def start_pipeline_run(cfg: Config, tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run; returns its id."""
    uri = cfg.tracking_uri()
    client = _client(uri)
    exp = experiment_id(uri, cfg.tracking.experiment)
    name = f"{cfg.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    all_tags = {"lmforge.config": cfg.name, "mlflow.source.type": "JOB", **_process_tags()}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update(tags or {})
    run = client.create_run(exp, run_name=name, tags=all_tags)
    run_id = run.info.run_id
    _log_params(client, run_id, _flatten(cfg.model_dump(mode="json")))
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    end_abandoned_runs(client, exp, run_id)
    return run_id


def _process_tags() -> dict[str, str]:
    """Which process on which host owns a run: how a later run tells a killed one from a live one."""
    return {"lmforge.pid": str(os.getpid()), "lmforge.host": socket.gethostname()}


def end_abandoned_runs(client, experiment: str, by_run_id: str) -> list[str]:
    """Mark FAILED the runs this host's killed lmforge processes left RUNNING (kill -9, out of
    memory: nothing could end them), each tagged with the run that noticed; that run is tagged with
    the pipeline runs it took over from. Returns the ids of the ended runs."""
    host = socket.gethostname()
    running = client.search_runs(
        [experiment], filter_string=f"attributes.status = 'RUNNING' and tags.`lmforge.host` = '{host}'"
    )
    ended, parents = [], []
    for run in running:
        pid = int(run.data.tags.get("lmforge.pid", "0") or 0)
        if run.info.run_id == by_run_id or process_alive(pid):
            continue
        client.set_tag(run.info.run_id, "lmforge.abandoned", f"process {pid} on {host} ended without ending it "
                       f"(killed, or the tracking server was away); noticed by run {by_run_id}")
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
        if "mlflow.parentRunId" not in run.data.tags:
            parents.append(run.info.run_id)
    if parents:
        client.set_tag(by_run_id, "lmforge.takes_over", ",".join(parents))
    return ended



@_user_errors
def start_stage_run(uri: str, parent_run_id: str, stage: str, params: Mapping[str, Any]) -> str:
    """A nested run for one stage, with the stage's config values as params. Values still open
    (None: a tokenizer file's vocabulary) are left for the stage's result to fill, so that every
    param is logged once, with the value in force."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "lmforge.stage": stage, **_process_tags()}
    tags.update({k: v for k, v in parent.data.tags.items() if k.startswith("lmforge.prefect")})
    run = client.create_run(parent.info.experiment_id, run_name=stage, tags=tags)
    _log_params(client, run.info.run_id, {k: v for k, v in params.items() if v is not None})
    return run.info.run_id


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # the store's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


@_user_errors
def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(dt.datetime.now().timestamp() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 500):
        _client(uri).log_batch(run_id, metrics=items[i : i + 500])


def _output_kept(fn):
    """A stage's logging that failed says its finished output is kept, and how it gets logged."""

    @functools.wraps(fn)
    def wrapper(uri: str, run_id: str, out_dir: Path, *args, **kwargs):
        try:
            return fn(uri, run_id, out_dir, *args, **kwargs)
        except TrackingError as e:
            raise TrackingError(
                f"{e}. The stage's output {out_dir} is complete and kept: run the same command again once the "
                "server answers, and it is logged from there"
            ) from None

    return wrapper


@_output_kept
@_user_errors
def log_stage_result(
    uri: str,
    run_id: str,
    out_dir: Path,
    result: StageResult,
    config_params: Mapping[str, Any],
    *,
    cached: bool,
    log_result_metrics: bool = True,
) -> None:
    """Log what a stage produced to its child run: metrics, params, artifacts, dataset inputs; and
    the training metrics its run could not send then (:data:`UNSENT_METRICS`), to their own run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    send_unsent_metrics(uri, Path(out_dir) / UNSENT_METRICS)
    client = _client(uri)
    client.set_tag(run_id, "lmforge.cached", str(cached).lower())
    client.set_tag(run_id, "lmforge.output", str(out_dir))
    for key, value in result.tags.items():
        client.set_tag(run_id, key, value)
    # The result's params, and the config values that were still open at the start (see start_stage_run).
    _log_params(client, run_id, {**{k: v for k, v in config_params.items() if v is None}, **result.params})
    if log_result_metrics:
        log_metrics(uri, run_id, result.metrics)
    for rel in result.artifacts:
        path = (out_dir / rel).resolve()
        if not path.is_relative_to(out_dir.resolve()) or not path.exists():
            log.warning("artifact %s is not inside %s; not logged", rel, out_dir)
            continue
        if cached and path.is_file() and path.stat().st_size > CACHED_ARTIFACT_MAX_BYTES:
            continue  # uploaded by the run that made it (tag lmforge.output points at it); not again
        if path.is_dir():
            client.log_artifacts(run_id, str(path), rel)
        else:
            client.log_artifact(run_id, str(path))
    for rel in result.tables:
        path = (out_dir / rel).resolve()
        if path.is_relative_to(out_dir.resolve()) and path.is_file():
            # MlflowClient.log_table: the UI's evaluation/table view shows it row by row.
            import pandas as pd

            client.log_table(run_id, data=pd.read_csv(path, keep_default_na=False), artifact_file=Path(rel).with_suffix(".json").name)
    inputs = []
    for ds in result.datasets:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str((out_dir / ds["path"]).resolve()))
        meta = MetaDataset(source=source, name=ds.get("name"), digest=str(ds.get("digest", ""))[:36] or None)
        context = ds.get("context", "training")
        inputs.append(DatasetInput(meta._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


# ---- a training run's metrics, sent from a thread: the server may be away for a while -------------

UNSENT_METRICS = "unsent_metrics.jsonl"  # in the stage's folder: points the server never took
FLUSH_SECONDS = 10.0  # how long a finished training waits for the server to take what is left


# How the training process's MLflow client retries (set by its entry point, lm.training.child, unless the user
# set them): one quick failure per try instead of MLflow's default backoff (7 retries, up to 2 minutes
# a sleep, about 4 minutes a call). MetricSender tries again every RETRY_SECONDS for as long as
# training lasts, and a call stuck in a long backoff would hold the points back long after the
# server returned, and hold up the end of training.
SENDER_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class MetricSender:
    """Sends a training run's metrics (and sample texts) to its MLflow run from a background thread,
    so that training never waits for the tracking server. Points the server does not take stay
    queued, in order, and are offered again every ``RETRY_SECONDS`` until it takes them; at
    :meth:`close` what is still unsent is appended to ``unsent_path`` (:data:`UNSENT_METRICS`),
    which :func:`log_stage_result` sends later. A point keeps its timestamp, so one sent twice is
    stored once."""

    RETRY_SECONDS = 2.0
    BATCH = 1000  # the REST API's metrics-per-log_batch limit

    def __init__(self, uri: str, run_id: str, unsent_path: Path) -> None:
        import collections
        import threading

        self.uri, self.run_id, self.unsent_path = uri, run_id, Path(unsent_path)
        self._points: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._texts: collections.deque[tuple[str, str]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: str | None = None  # the latest failure, while the server does not take points
        self.sent = 0

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(dt.datetime.now().timestamp() * 1000)
        self._put(self._points, [(k, float(v), now, int(step)) for k, v in metrics.items()])

    def add_text(self, text: str, artifact_file: str) -> None:
        self._put(self._texts, [(text, artifact_file)])

    def _put(self, queue, items: list) -> None:
        import threading

        with self._cond:
            if self._closed:
                return
            queue.extend(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _send_loop(self) -> None:
        import time

        from mlflow.entities import Metric

        client = _client(self.uri)
        while True:
            with self._cond:
                while not (self._points or self._texts or self._closed):
                    self._cond.wait()
                if self._closed:
                    return  # close() took what was left
                points = [self._points[i] for i in range(min(self.BATCH, len(self._points)))]
                text = None if points else self._texts[0]
            try:
                if points:
                    client.log_batch(self.run_id, metrics=[Metric(*p) for p in points])
                else:
                    client.log_text(self.run_id, *text)
            except Exception as e:  # the server is away (or refused): keep them, try again
                self.error = _first_line(e)
                time.sleep(self.RETRY_SECONDS)
                continue
            with self._cond:
                if self._closed:
                    return
                for _ in points:
                    self._points.popleft()
                if text is not None:
                    self._texts.popleft()
                self.sent += len(points)
                self.error = None
                self._cond.notify_all()

    def close(self, timeout: float = FLUSH_SECONDS) -> str | None:
        """Wait up to ``timeout`` seconds for the server to take what is queued; append what it did not
        to ``unsent_path``. Returns one line saying what was not sent and where it is, or None."""
        import json
        import time

        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._points or self._texts) and self._thread is not None and time.monotonic() < deadline:
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self._closed = True
            points, texts = list(self._points), len(self._texts)
            self._points.clear()
            self._texts.clear()
            self._cond.notify_all()
        if not points and not texts:
            return None
        if points:
            old = self.unsent_path.read_text(encoding="utf-8") if self.unsent_path.is_file() else ""
            rows = (json.dumps({"run_id": self.run_id, "key": k, "value": v, "timestamp": t, "step": s})
                    for k, v, t, s in points)
            atomic_write(self.unsent_path, old + "".join(r + "\n" for r in rows))
        steps = sorted({p[3] for p in points})
        what = [f"{len(points)} metric points (steps {steps[0]}-{steps[-1]}) are kept in {self.unsent_path} "
                "and sent when the stage's results are logged"] if points else []
        if texts:
            what.append(f"{texts} sample texts were not logged (samples.txt holds them)")
        return (f"MLflow tracking server {display_uri(self.uri)} did not take the last metrics within "
                f"{timeout:.0f} s ({self.error or 'no answer'}): " + "; ".join(what))


def send_unsent_metrics(uri: str, path: Path) -> int:
    """Send the points a training run could not (``MetricSender.close`` wrote them to ``path``) to
    the runs they belong to, then remove the file. Returns how many were sent."""
    import json

    from mlflow.entities import Metric

    if not path.is_file():
        return 0
    by_run: dict[str, list] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = json.loads(line)
            by_run.setdefault(p["run_id"], []).append(Metric(p["key"], p["value"], p["timestamp"], p["step"]))
    client = _client(uri)
    for run_id, points in by_run.items():
        for i in range(0, len(points), MetricSender.BATCH):
            client.log_batch(run_id, metrics=points[i : i + MetricSender.BATCH])
    path.unlink(missing_ok=True)
    n = sum(map(len, by_run.values()))
    log.info("sent %d metric points that training could not send (%s)", n, path)
    return n


def end_run(uri: str, run_id: str, ok: bool) -> None:
    if not ok and uri in _UNREACHABLE:
        # Ending a failed run (in a finally) must not hide why it failed behind "unreachable" again;
        # the next pipeline run marks it FAILED (end_abandoned_runs).
        log.warning("MLflow run %s is left RUNNING: the tracking server %s did not answer", run_id, display_uri(uri))
        return
    _end_run(uri, run_id, ok)


@_user_errors
def _end_run(uri: str, run_id: str, ok: bool) -> None:
    _client(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


SYSTEM_METRICS_FINISH_SECONDS = 15.0


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval: float = 5.0) -> Iterator[None]:
    """Sample CPU, memory (and GPU, where pynvml finds one) into the run while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        # finish() waits for the monitor's thread, which may be inside a call to a tracking server that
        # is away (MLflow's retries: minutes); the stage does not wait that long for samples.
        import threading

        done = threading.Thread(target=monitor.finish, name="system-metrics-finish", daemon=True)
        done.start()
        done.join(SYSTEM_METRICS_FINISH_SECONDS)
        if done.is_alive():
            log.warning("system metrics: the tracking server %s did not answer within %.0f s; the last "
                        "samples are not logged", display_uri(uri), SYSTEM_METRICS_FINISH_SECONDS)


@_user_errors
def run_page(uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in the MLflow UI that ``make ui`` starts (its runs table: the stages nest under it),
    in the UI's model-training view (MLflow 3.17 opens its GenAI view unless the link asks)."""
    return f"{ui}/#/experiments/{_client(uri).get_run(run_id).info.experiment_id}/runs/{run_id}?{UI_VIEW}"


@_user_errors
def run_tree(uri: str, parent_run_id: str) -> dict[str, Any]:
    """The parent run and its children by stage name: what the summary and the tests read."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {"parent": parent, "children": {r.info.run_name: r for r in children}}


# ---- what a reviewer opens first: the parent run's summary, and the list of pipeline runs ----------

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
MODEL_VERSION_TAG = "lmforge.model_version"  # models:/<name>/<version> this pipeline run registered


@_user_errors
def summarize_pipeline_run(uri: str, parent_run_id: str) -> str:
    """Give the parent run what its stages' child runs hold, where a reviewer looks first: the key
    metrics (lm.tracking.report.parent_metrics), the datasets the stages logged, the model version deploy
    registered (tags, a link, the logged model as the run's output) and the markdown description.
    Returns the description."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput

    from lm.tracking import report

    client = _client(uri)
    tree = run_tree(uri, parent_run_id)
    parent = tree["parent"]
    children = sorted(tree["children"].values(), key=lambda r: r.info.start_time)
    stages = {
        r.info.run_name: report.StageRun(
            metrics={k: v for k, v in r.data.metrics.items() if not k.startswith("system/")},
            params=dict(r.data.params),
            tags=dict(r.data.tags),
            seconds=(r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None,
        )
        for r in children
    }
    seconds = dt.datetime.now().timestamp() - parent.info.start_time / 1000
    log_metrics(uri, parent_run_id, report.parent_metrics(stages, seconds))

    # The datasets each stage logged (documents, clean splits, evaluation sets), on the parent too.
    seen, inputs = set(), []
    for run in children:
        for di in run.inputs.dataset_inputs:
            d = di.dataset
            if (d.name, d.digest) not in seen:
                seen.add((d.name, d.digest))
                copy = Dataset(d.name, d.digest, d.source_type, d.source, d.schema, d.profile)
                inputs.append(DatasetInput(copy, tags=[InputTag(t.key, t.value) for t in di.tags]))
    if inputs:
        client.log_inputs(parent_run_id, datasets=inputs)

    champion = model_version = link = None
    deploy = stages.get("deploy")
    if deploy is not None and "deploy/version" in deploy.metrics:
        name = deploy.params["deploy.model_name"]
        version = client.get_model_version(name, str(int(deploy.metrics["deploy/version"])))
        model_version = f"models:/{name}/{version.version}"
        link = f"#/models/{name}/versions/{version.version}"
        tags = {MODEL_VERSION_TAG: model_version, "lmforge.promote_metric": deploy.params["deploy.promote_metric"]}
        tags.update({k: v for k, v in deploy.tags.items() if k in ("lmforge.decision", "lmforge.decision_reason")})
        for key, value in tags.items():
            client.set_tag(parent_run_id, key, value)
        model_id = _logged_model_of(client, version)
        logged = {o.model_id for o in (parent.outputs.model_outputs if parent.outputs else [])}
        if model_id and model_id not in logged:  # the run page lists its version under "Registered models"
            client.log_outputs(parent_run_id, [LoggedModelOutput(model_id, step=0)])
        held = deploy.params.get("champion_version", "none")  # before the decision; this version on a rerun
        if held != "none":
            theirs = version if held == str(version.version) else client.get_model_version(name, held)
            champion = report.Champion(
                held,
                {k: float(v) for k, v in theirs.tags.items() if k.startswith("eval/")},
                same_set=theirs.tags.get("lmforge.eval_set") == deploy.params.get("eval_set"),
            )
    note = report.summary_markdown(
        run_name=parent.info.run_name,
        config=parent.data.tags.get("lmforge.config", "?"),
        targets=parent.data.tags.get("lmforge.targets", "all"),
        commit=parent.data.tags.get("mlflow.source.git.commit"),
        seconds=seconds,
        stages=stages,
        champion=champion,
        model_version=model_version,
        model_link=link,
        figures=_figures(client, tree["children"]),
    )
    client.set_tag(parent_run_id, NOTE_TAG, note)
    return note


# The stages' pictures, shown in the parent's description through the UI server's artifact endpoint
# (a path relative to the UI's root: the description is rendered there).
FIGURES = (("clean", "length_hist.png"), ("clean", "dropped_by_reason.png"), ("evaluate", "loss_curves.png"),
           ("evaluate", "confusion.png"))


def _figures(client, children: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for stage, name in FIGURES:
        if stage in children:
            run_id = children[stage].info.run_id
            if any(a.path == name for a in client.list_artifacts(run_id)):
                out.append((f"{stage}: {name}", f"get-artifact?path={name}&run_uuid={run_id}"))
    return out


def _logged_model_of(client, version) -> str | None:
    """The logged model a registered version was made from, tagged with the version
    (``mlflow.modelVersions``: how the UI goes from a run's logged model to its registered version).
    A sqlite registry keeps no ``model_id`` on the version: then it is the model its run logged."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model_id = version.model_id
    if not model_id:
        run = client.get_run(version.run_id)
        found = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{version.run_id}'", max_results=1
        )
        model_id = found[0].model_id if found else None
    if model_id:
        model = client.get_logged_model(model_id)
        linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        this = {"name": version.name, "version": str(version.version)}
        if this not in linked:
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, this])})
    return model_id


@_user_errors
def pipeline_runs(uri: str, experiment: str, last: int) -> list[dict[str, Any]]:
    """The ``last`` newest pipeline (parent) runs of ``experiment``, newest first, as plain dicts
    (run_id, name, start and end in ms, status, metrics, tags); none when the experiment does not exist."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return []  # no store yet: reading must not create one
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.mlflow.parentRunId IS NULL",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "start": r.info.start_time,
            "end": r.info.end_time,
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
            "tags": dict(r.data.tags),
        }
        for r in runs
    ]
