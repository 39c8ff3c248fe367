"""A training run's metrics, sent to its MLflow run from a background thread: training never waits
for the tracking server, which may be away for a while (:class:`MetricSender`); what it never took
is kept in the stage's folder (:data:`UNSENT_METRICS`) and sent when the stage's results are logged
(:func:`send_unsent_metrics`).

The training child imports this: no MLflow at module import (the sender's thread imports it).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from pathlib import Path

from lm.config import display_uri
from lm.fileio import atomic_write
from lm.tracking.client import mlflow_client, short_error

log = logging.getLogger(__name__)

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
    which ``lm.tracking.runs.log_stage_result`` sends later. A point keeps its timestamp, so one
    sent twice is stored once."""

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

        client = mlflow_client(self.uri)
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
                self.error = short_error(e)
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
    client = mlflow_client(uri)
    for run_id, points in by_run.items():
        for i in range(0, len(points), MetricSender.BATCH):
            client.log_batch(run_id, metrics=points[i : i + MetricSender.BATCH])
    path.unlink(missing_ok=True)
    n = sum(map(len, by_run.values()))
    log.info("sent %d metric points that training could not send (%s)", n, path)
    return n
