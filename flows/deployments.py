"""Every lmforge Prefect deployment, declared here; serving them, and triggering one from the terminal.

``lmforge schedule`` serves, on the Prefect server PREFECT_API_URL points at (``make schedule``
starts a local one):

- ``lmforge-pipeline/retrain``: the whole pipeline, on a cron schedule when one is given;
- ``lmforge-pipeline/<stage>`` for every stage of the table (``ingest`` ... ``deploy``): that stage
  and the stages it reads, from cache when unchanged, as ``lmforge <stage>`` does (a stage's own
  subflow needs the folders of the stages before it, which only the pipeline knows);
- ``lmforge-new-data/watch``: the new-data check (``flows/watch.py``) every ``retrain.check_every_s``.

Each pipeline deployment holds the resolved config as its parameter (a pydantic model: the Prefect
UI renders it as a form, section by section, beside ``targets`` and ``trigger``); what runs is what
was served, until the deployments are served again with another config. Each deployment runs at
most one run at a time and cancels a new one while one runs: a runner started after downtime would
otherwise launch the whole backlog of missed runs at once. For a team, the same deployments go to a
work pool on a shared server (README, "Scheduled retraining").
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.types.entrypoint import EntrypointType

from flows.pipeline import pipeline
from flows.watch import PIPELINE_FLOW, new_data_check
from lm.config import Config, apply_overrides
from lm.errors import LmforgeError
from lm.pipeline.stage import Stage
from lm.stages import STAGES

RETRAIN = "retrain"
WATCH = "watch"


def one_at_a_time() -> ConcurrencyLimitConfig:
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def _importable(deployment):
    # The pipeline flow is built inside build_pipeline(); Prefect would record that function's local
    # as the entrypoint, which a worker (a work pool's process) cannot import. The module's own is.
    module = deployment.entrypoint_type == EntrypointType.MODULE_PATH
    deployment.entrypoint = "flows.pipeline.pipeline" if module else "flows/pipeline.py:pipeline"
    return deployment


def retrain_deployment(name: str, cron: str | None, config: Config, entrypoint_type=EntrypointType.FILE_PATH):
    """The whole pipeline as a Prefect deployment (on a cron schedule when given), one run at a time."""
    return _importable(pipeline.to_deployment(
        name=name,
        entrypoint_type=entrypoint_type,
        cron=cron,
        parameters={"config": config.model_dump(mode="json"), "targets": None, "trigger": "manual"},
        concurrency_limit=one_at_a_time(),
        description="lmforge retraining: the whole pipeline; unchanged stages are reused from cache, "
        "and the registry alias moves only if the new model is better.",
        tags=["lmforge"],
    ))


def stage_deployment(stage: Stage, config: Config, entrypoint_type=EntrypointType.FILE_PATH):
    """One stage and the stages it reads (from cache when unchanged), one run at a time."""
    return _importable(pipeline.to_deployment(
        name=stage.command,
        entrypoint_type=entrypoint_type,
        parameters={"config": config.model_dump(mode="json"), "targets": [stage.name], "trigger": "manual"},
        concurrency_limit=one_at_a_time(),
        description=f"lmforge {stage.command}: {stage.help} (after the stages it needs, from cache when unchanged)",
        tags=["lmforge"],
    ))


def watch_deployment(config: Config, retrain: str = RETRAIN, entrypoint_type=EntrypointType.FILE_PATH):
    """The new-data check every ``retrain.check_every_s`` seconds, starting ``retrain`` when it should."""
    return new_data_check.to_deployment(
        name=WATCH,
        entrypoint_type=entrypoint_type,
        interval=config.retrain.check_every_s,
        parameters={"deployment": f"{PIPELINE_FLOW}/{retrain}"},
        concurrency_limit=one_at_a_time(),
        description="lmforge new-data trigger: starts the retrain deployment when enough new or changed "
        "source files appear (retrain.min_new_files, retrain.min_new_mb)",
        tags=["lmforge"],
    )


def deployments(config: Config, cron: str | None, retrain: str = RETRAIN, table: Sequence[Stage] = STAGES,
                entrypoint_type=EntrypointType.FILE_PATH) -> list:
    """Every deployment ``lmforge schedule`` serves: the retrain, one per stage, the new-data check.
    A work pool's workers import the flows by module path (lmforge installed there)."""
    return [
        retrain_deployment(retrain, cron, config, entrypoint_type),
        *(stage_deployment(stage, config, entrypoint_type) for stage in table),
        watch_deployment(config, retrain, entrypoint_type),
    ]


def deploy_to_work_pool(config: Config, cron: str | None, pool: str, image: str | None = None,
                        retrain: str = RETRAIN) -> list:
    """Register every deployment on a work pool (a team's shared server: ``prefect worker start
    --pool POOL`` runs them where lmforge is installed, or in ``image`` on Kubernetes); returns their ids."""
    from prefect import deploy

    return deploy(*deployments(config, cron, retrain, entrypoint_type=EntrypointType.MODULE_PATH),
                  work_pool_name=pool, image=image, build=False, push=False, print_next_steps_message=False)


def serve_deployments(config: Config, cron: str | None, retrain: str = RETRAIN) -> None:
    """Register every deployment and run their flow runs here until stopped (Ctrl-C)."""
    from prefect import serve

    serve(*deployments(config, cron, retrain))


# ---- a local Prefect server (make schedule) ---------------------------------------------------


def _healthy(api: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout) as r:  # noqa: S310 (loopback)
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_server(workdir: str, host: str, port: int, startup_s: float = 180.0) -> Iterator[str]:
    """The API URL of a Prefect server on ``host:port``: the one running there, else one started
    here (SQLite under ``<workdir>/prefect``; stopped on exit). Sets PREFECT_API_URL for this process."""
    api = f"http://{host}:{port}/api"
    proc = None
    if not _healthy(api):
        home = Path(workdir).expanduser().resolve() / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        log = open(home / "server.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + startup_s
        while not _healthy(api):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise LmforgeError(f"the Prefect server on {host}:{port} did not start; see {home / 'server.log'}")
            time.sleep(1)
        print(f"lmforge: started a Prefect server on http://{host}:{port} (SQLite in {home}; log server.log)")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = api  # for the flow runs' processes; the settings, for this one
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            yield api
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---- lmforge trigger -------------------------------------------------------------------------


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise LmforgeError(
            "PREFECT_API_URL is not set: start a server and the deployments (make schedule), then "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def _find_deployment(client, name: str):
    """A deployment by ``flow/deployment`` or by its deployment name alone (``retrain``, ``tokenize``)."""
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            pass
    else:
        found = [d for d in client.read_deployments() if d.name == name]
        if len(found) == 1:
            return found[0]
    flows = {f.id: f.name for f in client.read_flows()}
    known = sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())
    raise LmforgeError(
        f"deployment {name!r} does not exist on {_api_url()}; it has: {', '.join(known) or 'none'} "
        "(lmforge schedule registers lmforge's)"
    )


def trigger(name: str, overrides: Sequence[str], echo: Callable[[str], None] = print, poll_s: float = 2.0) -> int:
    """Start a run of deployment ``name`` (config overrides applied) on the Prefect server at
    PREFECT_API_URL, print its state changes, its Prefect UI page and its MLflow parent run; 0 when
    it completed, 1 when it did not."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.urls import url_for

    from lm.tracking.runs import pipeline_runs, run_page

    api = _api_url()
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        if problem is not None:
            raise LmforgeError(f"no Prefect server answers at {api} ({str(problem).splitlines()[0][:200]}): "
                               "start one (make schedule) or fix PREFECT_API_URL")
        dep = _find_deployment(client, name)
        parameters: dict = {}
        cfg = None
        if "config" in (dep.parameters or {}):
            cfg = apply_overrides(dep.parameters["config"], list(overrides), f"deployment {dep.name}'s config")
            parameters = {"config": cfg.model_dump(mode="json"), "trigger": "manual"}
        elif overrides:
            raise LmforgeError(f"deployment {dep.name} takes no config: leave out {' '.join(overrides)}")
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        page = url_for("flow-run", obj_id=str(run.id))
        echo(f"lmforge: started {dep.name} flow run {run.name} ({run.id})")
        if page:
            echo(f"  Prefect UI: {page}")
        last, parent = None, None
        try:
            while True:
                run = client.read_flow_run(run.id)
                if run.state is not None and run.state.name != last:
                    last = run.state.name
                    echo(f"  {time.strftime('%H:%M:%S')} {last}")
                if cfg is not None and parent is None and run.state is not None and not run.state.is_scheduled():
                    with contextlib.suppress(Exception):  # the store may not exist yet; asked again
                        made = pipeline_runs(cfg.tracking_uri(), cfg.tracking.experiment, 1, flow_run_id=str(run.id))
                        parent = made[0] if made else None
                    if parent is not None:
                        pid = parent["run_id"]
                        echo(f"  MLflow parent run: {pid}  {run_page(cfg.tracking_uri(), pid)}")
                if run.state is not None and run.state.is_final():
                    break
                time.sleep(poll_s)
        except KeyboardInterrupt:
            echo(f"lmforge: stopped following; the run goes on: {page or run.id}")
            return 130
    if run.state.is_completed():
        echo(f"lmforge: {dep.name} run {run.name} completed")
        return 0
    why = (run.state.message or "").strip().splitlines()
    print(f"lmforge: error: {dep.name} run {run.name} ended {run.state.name}" + (f": {why[0][:300]}" if why else ""),
          file=sys.stderr)
    return 1
