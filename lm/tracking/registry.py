"""The MLflow model registry: register an exported model and promote it behind an alias only if
it beats the version that holds the alias now (a promotion gate, not a blind overwrite).

Every new version takes the alias ``challenger``; it takes ``deploy.alias`` (``champion``) only if
its ``deploy.promote_metric`` beats the champion's by ``deploy.promote_margin`` on the same frozen
evaluation set (a digest of the held-out files and settings, ``lm.pipeline.evaluate.evaluation_set_digest``).
A champion measured on other data is first re-scored on this run's (issue 10). Both numbers and the
decision are tags of the version; people move the alias with :func:`promote` and :func:`rollback`,
and each alias keeps its history on the registered model.

Two deploys at once (two triggered retrains) cannot let the slower, worse one overwrite a better
champion: the alias moves only if its holder is still the version the decision compared with,
re-read under a file lock next to a local sqlite store (:func:`promotion_lock`); if another run
moved it meanwhile, the decision is made again against the new holder. A remote store
(``http://``, a database server) has no file to lock: there the holder is re-read just before the
move and again a moment after it, and a deploy that then finds another version holding the alias
compares again, taking it back only if it is better, so the better one ends as champion (best
effort: see :func:`_decide_and_move`).

Only ``MlflowClient`` calls, with the tracking URI and run id passed in: no global "active run",
which Prefect's task threads would share. Registry stages are deprecated in MLflow 3; aliases
(``models:/name@champion``) replace them, and a model is a LoggedModel linked to the run that
made it.

The registered model is self-contained: the export folder, lmforge's own ``lm`` package as code
(it is not published on PyPI), and pip requirements pinned to the versions it was made with. It
loads with ``mlflow.pyfunc.load_model`` through a models-from-code entry (``pyfunc_model.py``),
so loading never unpickles anything (CVE-2024-37052).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import hashlib
import importlib.metadata
import json
import logging
import math
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lm.config import DeployConfig, display_uri
from lm.errors import ConfigError, DataError, RegistryError, TrackingError
from lm.fileio import exclusive_lock
from lm.pipeline.stage import StageResult

log = logging.getLogger(__name__)

# What loading the model imports (lm.finetune.<method>, lm.models.transformer, lm.text.tokenize_stage, lm.config ...).
REQUIREMENTS = (
    "torch",
    "lightning",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "jinja2",  # chat templates (lm.text.chat)
)
EXPORT_KEY_TAG = "lmforge_export_key"


def pip_requirements() -> list[str]:
    """The model's requirements, pinned to this environment's versions (local build tags such as
    ``+cpu`` dropped: pip resolves the public release)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def _save_pyfunc(export_dir: Path, work: Path) -> Path:
    """The MLflow model folder for ``export_dir``: pyfunc files, the export, lmforge's code."""
    import mlflow
    from mlflow.models import Model, infer_signature
    from mlflow.models.model import MLMODEL_FILE_NAME

    from lm.finetune import method
    from lm.models.folder import read_model_json

    code = work / "code" / "lm"
    # The package's sources only: compiled .pyc files carry the absolute path they were built from.
    shutil.copytree(Path(__file__).parents[1], code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    predictor = method(read_model_json(export_dir)["task"]).Predictor(export_dir)
    example = predictor.input_example()
    model_dir = work / "model"
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"model": str(export_dir)},
        code_paths=[str(code)],
        pip_requirements=pip_requirements(),
        # Generation params (max_new_tokens, temperature ...) are part of the signature, so
        # predict(..., params=...) and the scoring server pass them through.
        signature=infer_signature(example, predictor.predict(example), params=getattr(predictor, "PARAM_DEFAULTS", None)),
        input_example=example,
    )
    # MLflow notes where the files came from (this machine's paths); loading reads only the copies.
    mlmodel = Model.load(str(model_dir / MLMODEL_FILE_NAME))
    pyfunc = mlmodel.flavors["python_function"]
    pyfunc["model_code_path"] = Path(pyfunc["model_code_path"]).name
    for artifact in pyfunc.get("artifacts", {}).values():
        artifact.pop("uri", None)
    mlmodel.save(str(model_dir / MLMODEL_FILE_NAME))
    return model_dir


# What every version and the deploy run carry about the promotion decision (issue 10).
CHALLENGER = "challenger"  # every newly registered version takes this alias
EVAL_SET_TAG = "lmforge.eval_set"  # digest of the data its promotion metric was measured on
PROMOTE_METRIC_TAG = "lmforge.promote_metric"
DECISION_TAG = "lmforge.decision"  # promoted | kept | manual promote | rollback
REASON_TAG = "lmforge.decision_reason"  # one sentence: both numbers, where they come from, the margin
CHAMPION_VERSION_TAG = "lmforge.champion_version"  # the version it was compared with
CHAMPION_VALUE_TAG = "lmforge.champion_value"  # that version's number on this version's evaluation set
CHAMPION_SCORED_TAG = "lmforge.champion_scored"  # same_set | rescored | unavailable | none
DECIDED_BY_TAG, DECIDED_AT_TAG = "lmforge.decided_by", "lmforge.decided_at"
# On the registered model: the versions that held an alias, oldest first (what rollback walks back).
HISTORY_TAG = "lmforge.alias_history.{alias}"
HISTORY_KEEP = 100  # entries kept: a tag value holds at most a few thousand characters
REMOTE_SETTLE_S = 2.0  # a remote store: how long after moving the alias it is read again (no lock there)

# rescore(export_folder, scratch_folder) -> the evaluate stage's metrics for that model on this run's data.
Rescore = Callable[[Path, Path], dict[str, float]]


@dataclass
class Decision:
    """Whether a version takes the alias, and why."""

    promoted: bool
    reason: str
    champion_version: str | None = None
    champion_value: float | None = None
    # same_set | rescored | unavailable | none (nobody held the alias) | not_compared (a rerun of a decided version)
    champion_scored: str = "none"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in a bare container
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _rescore_tag(eval_set: str, metric: str) -> str:
    """The champion's tag holding its number on another evaluation set, once re-scored there."""
    return f"lmforge.rescored.{eval_set[:16]}.{metric}"


def _alias_holder(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _history(client, name: str, alias: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG.format(alias=alias))
    return [str(v) for v in json.loads(raw)] if raw else []


def _set_history(client, name: str, alias: str, versions: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(versions[-HISTORY_KEEP:]))


def _move_alias(client, name: str, alias: str, version: str, previous: str | None) -> None:
    """Point ``alias`` at ``version`` and append it to the alias's history."""
    history = _history(client, name, alias)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)  # a holder set before the history existed, or by hand in MLflow's UI
    client.set_registered_model_alias(name, alias, version)
    _set_history(client, name, alias, [*history, version])


def _record(client, name: str, version: str, decision: str, reason: str, by: str, **extra: str) -> None:
    tags = {DECISION_TAG: decision, REASON_TAG: reason, DECIDED_BY_TAG: by, DECIDED_AT_TAG: _now(), **extra}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _champion_score(
    client, uri: str, cfg: DeployConfig, holder, eval_set: str, rescore: Rescore
) -> tuple[float | None, str, str]:
    """The holder's ``promote_metric`` on ``eval_set``: (value, same_set | rescored | unavailable, why not)."""
    metric, version = cfg.promote_metric, str(holder.version)
    if holder.tags.get(EVAL_SET_TAG) == eval_set and metric in holder.tags:
        return float(holder.tags[metric]), "same_set", ""
    earlier = holder.tags.get(_rescore_tag(eval_set, metric))
    if earlier is not None:
        return float(earlier), "rescored", ""
    try:
        with tempfile.TemporaryDirectory(prefix="lmforge-rescore-") as work:
            folder, _ = download_registered(f"models:/{holder.name}/{version}", uri, Path(work) / "model")
            (Path(work) / "eval").mkdir()
            scores = rescore(folder, Path(work) / "eval")
        if metric not in scores:
            raise DataError(f"its evaluation reports no {metric}")
        value = float(scores[metric])
    except Exception as e:  # a champion made by another lmforge, another method ...: say so, decide safely
        log.warning("could not re-score %s version %s on this evaluation set", holder.name, version, exc_info=True)
        return None, "unavailable", f"{type(e).__name__}: {e}"
    client.set_model_version_tag(holder.name, version, _rescore_tag(eval_set, metric), str(value))
    return value, "rescored", ""


def _decide(client, uri: str, cfg: DeployConfig, holder, new_value: float, eval_set: str, rescore: Rescore) -> Decision:
    """Promote only past the holder's number on the same evaluation set by at least the margin."""
    metric, margin, version = cfg.promote_metric, cfg.promote_margin, str(holder.version)
    old, scored, why = _champion_score(client, uri, cfg, holder, eval_set, rescore)
    if old is None:
        return Decision(
            False,
            f"kept: version {version} (@{cfg.alias}) could not be re-scored on this evaluation set ({why}); numbers "
            f"measured on different data are not compared, so {metric} {new_value:.4f} decides nothing: promote by "
            f"hand with `lmforge promote {cfg.model_name} VERSION` if it should take @{cfg.alias}",
            version,
            None,
            scored,
        )
    where = "same evaluation set" if scored == "same_set" else "champion re-scored on this evaluation set"
    if math.isnan(old):
        promoted, gain = not math.isnan(new_value), math.nan
    else:
        gain = new_value - old if cfg.promote_mode == "max" else old - new_value
        promoted = gain > 0 and gain >= margin  # margin 0: strictly better; a tie keeps the champion
    if promoted:
        verdict = f"promoted: beats it by {gain:.4f} >= margin {margin:g}"
    elif gain > 0:
        verdict = f"kept: better by {gain:.4f}, less than the margin {margin:g}"
    else:
        verdict = "kept: not better"
    return Decision(
        promoted,
        f"{verdict} ({metric} {new_value:.4f} vs version {version}'s {old:.4f}, {cfg.promote_mode} is better; {where})",
        version,
        old,
        scored,
    )


@contextlib.contextmanager
def promotion_lock(uri: str, name: str) -> Iterator[bool]:
    """Held while an alias of ``name`` is compared and moved: an exclusive ``flock`` on a file next
    to a local sqlite store (released by the OS if the process dies). Yields False where there is
    no such file (a remote store): the caller re-checks after moving instead."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        yield False
        return
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    lock = db.with_name(f"{db.name}.promote-{hashlib.sha256(name.encode()).hexdigest()[:12]}.lock")
    with exclusive_lock(lock):
        yield True


def _version_of(holder) -> str | None:
    return None if holder is None else str(holder.version)


def _decide_and_move(
    client, uri: str, cfg: DeployConfig, version: str, new_value: float, eval_set: str, rescore: Rescore, holder
) -> Decision:
    """Compare ``version`` with the alias's holder and move the alias to it if it is better, so that
    a concurrent deploy cannot be overwritten by a worse one (see the module docstring): the move
    happens only if the holder, re-read under :func:`promotion_lock`, is the one compared with;
    else the comparison is made again with the new holder (re-scoring, if needed, outside the lock).

    Without a lock (a remote store) two deploys may both re-read the old holder and both move: each
    reads the holder again :data:`REMOTE_SETTLE_S` after its move, and the one that finds the other
    holding it compares again, and moves it back only if it is better. The better one ends holding
    it unless the two moves are more than that far apart yet both between the other's reads."""
    name, alias = cfg.model_name, cfg.alias
    while True:
        if holder is None:
            decision = Decision(True, f"promoted: no version held @{alias}")
        else:
            decision = _decide(client, uri, cfg, holder, new_value, eval_set, rescore)
        if not decision.promoted:
            return decision
        with promotion_lock(uri, name) as locked:
            current = _alias_holder(client, name, alias)
            if _version_of(current) == _version_of(holder):
                _move_alias(client, name, alias, version, _version_of(holder))
                if locked:
                    return decision
                time.sleep(REMOTE_SETTLE_S)
                current = _alias_holder(client, name, alias)
                if _version_of(current) == version:
                    return decision
        log.info("%s@%s was moved to version %s while version %s was compared with version %s: comparing again",
                 name, alias, _version_of(current), version, _version_of(holder))
        holder = current


def deploy(
    cfg: DeployConfig,
    uri: str,
    run_id: str,
    export_dir: Path,
    export_key: str,
    metrics: dict[str, float],
    *,
    eval_set: str,
    rescore: Rescore,
    out_dir: Path | None = None,
) -> StageResult:
    """Register ``export_dir`` as a version of ``cfg.model_name`` (once per export) with the alias
    ``challenger``; move ``cfg.alias`` to it only if it beats the holder's ``cfg.promote_metric``
    on the same evaluation set (``eval_set``, a digest) by ``cfg.promote_margin``. A holder
    measured on another set is first re-scored on this one with ``rescore``."""
    from mlflow.tracking import MlflowClient

    if cfg.promote_metric not in metrics:
        raise ConfigError(
            f"deploy.promote_metric={cfg.promote_metric!r} is not among the evaluate stage's metrics: "
            f"{', '.join(sorted(metrics))}"
        )
    client = MlflowClient(tracking_uri=uri)
    _ensure_registered_model(client, cfg.model_name)
    version, reused = _register_once(client, cfg, run_id, export_dir, export_key, metrics, eval_set)
    this_version = str(version.version)
    new_value = float(metrics[cfg.promote_metric])
    decision = _promote_if_better(client, uri, cfg, run_id, version, reused, new_value, eval_set, rescore)
    log.info("%s version %s: %s", cfg.model_name, this_version, decision.reason)
    return _deploy_result(cfg, this_version, reused, new_value, eval_set, decision)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="lmforge model (see each version's run)")


def _register_once(
    client, cfg: DeployConfig, run_id: str, export_dir: Path, export_key: str, metrics: dict[str, float], eval_set: str
) -> tuple:
    """The version of ``cfg.model_name`` made from this export, and whether it existed: the same
    export registered twice is one version (reruns with nothing changed add nothing). A new one is
    logged as the run's model, tagged with its metrics and evaluation set, and takes ``challenger``."""
    name = cfg.model_name
    existing = client.search_model_versions(f"name = '{name}' and tag.{EXPORT_KEY_TAG} = '{export_key}'")
    if existing:
        return existing[0], True
    experiment = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="lmforge-model-") as work:
        model_dir = _save_pyfunc(Path(export_dir), Path(work))
        logged = client.create_logged_model(experiment, name="model", source_run_id=run_id)
        client.log_model_artifacts(logged.model_id, str(model_dir))
        client.finalize_logged_model(logged.model_id, "READY")
    tags = {EXPORT_KEY_TAG: export_key, EVAL_SET_TAG: eval_set, PROMOTE_METRIC_TAG: cfg.promote_metric,
            **{k: str(v) for k, v in metrics.items()}}
    # The logged model's storage location, not models:/<id>: MLflow's registry store resolves such a
    # URI with the process-global tracking URI, not this client's (mlflow/store/model_registry).
    version = client.create_model_version(
        name, source=logged.artifact_location, run_id=run_id, tags=tags, model_id=logged.model_id
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version, False


def _promote_if_better(
    client, uri: str, cfg: DeployConfig, run_id: str, version, reused: bool, new_value: float, eval_set: str,
    rescore: Rescore,
) -> Decision:
    """The decision on ``version``: nothing to do where it holds the alias already or was decided on
    before (a rerun); else compared with the holder, the alias moved if it is better, and the
    decision recorded on the version."""
    name, this_version = cfg.model_name, str(version.version)
    holder = _alias_holder(client, name, cfg.alias)
    decided = version.tags.get(DECISION_TAG) if reused else None
    if holder is not None and str(holder.version) == this_version:
        return Decision(True, f"already holds @{cfg.alias}", this_version, new_value, "same_set")
    if decided is not None:
        # A rerun must not undo what happened since (a rollback, a better version): only people move it back.
        return Decision(
            False,
            f"kept: this export is version {this_version}, decided on before ({decided}); a rerun does not decide "
            f"again (`lmforge promote {name} {this_version}` moves @{cfg.alias})",
            None if holder is None else str(holder.version),
            None,
            "not_compared",
        )
    decision = _decide_and_move(client, uri, cfg, this_version, new_value, eval_set, rescore, holder)
    extra = {CHAMPION_VERSION_TAG: decision.champion_version or "none", CHAMPION_SCORED_TAG: decision.champion_scored}
    if decision.champion_value is not None:
        extra[CHAMPION_VALUE_TAG] = str(decision.champion_value)
    _record(client, name, this_version, "promoted" if decision.promoted else "kept", decision.reason,
            f"lmforge deploy (run {run_id})", **extra)
    return decision


def _deploy_result(
    cfg: DeployConfig, version: str, reused: bool, new_value: float, eval_set: str, decision: Decision
) -> StageResult:
    """What the deploy stage's run records: the version, the decision and both numbers."""
    metrics = {"deploy/version": float(version), "deploy/promoted": float(decision.promoted),
               "deploy/new_value": new_value}
    if decision.champion_value is not None:
        metrics["deploy/champion_value"] = decision.champion_value
    return StageResult(
        metrics=metrics,
        params={"reused_version": reused, "eval_set": eval_set, "champion_version": decision.champion_version or "none",
                "champion_scored": decision.champion_scored},
        tags={DECISION_TAG: "promoted" if decision.promoted else "kept", REASON_TAG: decision.reason},
        outputs={
            "model_uri": f"models:/{cfg.model_name}/{version}",
            "alias_uri": f"models:/{cfg.model_name}@{cfg.alias}",
        },
    )


def _registered(uri: str, name: str):
    """A client for ``uri`` and the registered model ``name``, or a RegistryError saying it is not there."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"the registry at {display_uri(uri)} cannot be read: {e.message.splitlines()[0]}") from None
        raise RegistryError(f"no registered model {name!r} at {display_uri(uri)}") from None
    return client


def promote(uri: str, name: str, version: str, alias: str = "champion") -> str:
    """Move ``alias`` of ``name`` to ``version`` by hand; recorded on the version (who, when) and in
    the alias's history. Returns what happened, in one line."""
    from mlflow.exceptions import MlflowException

    client = _registered(uri, name)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version!r} at {display_uri(uri)}") from None
    with promotion_lock(uri, name):  # not between a deploy's last read of the holder and its move
        holder = _alias_holder(client, name, alias)
        previous = None if holder is None else str(holder.version)
        if previous == str(version):
            return f"{name} version {version} already holds @{alias}"
        _move_alias(client, name, alias, str(version), previous)
    _record(client, name, str(version), "manual promote", f"manual promote: @{alias} moved from version {previous}",
            _who())
    return f"{name}@{alias}: version {previous} -> {version} (manual promote)"


def rollback(uri: str, name: str, alias: str = "champion") -> str:
    """Move ``alias`` of ``name`` back to the version that held it before the current one."""
    client = _registered(uri, name)
    with promotion_lock(uri, name):
        return _rollback(client, name, alias)


def _rollback(client, name: str, alias: str) -> str:
    from mlflow.exceptions import MlflowException

    holder = _alias_holder(client, name, alias)
    current = None if holder is None else str(holder.version)
    history = _history(client, name, alias)
    while history:
        if history[-1] == current:
            history.pop()
            continue
        try:
            client.get_model_version(name, history[-1])
            break
        except MlflowException:  # deleted since it held the alias
            history.pop()
    if not history:
        now = f"held now by version {current}" if current else "no version holds it now"
        raise RegistryError(f"{name}@{alias}: no earlier version to roll back to ({now})")
    target = history[-1]
    client.set_registered_model_alias(name, alias, target)
    _set_history(client, name, alias, history)
    _record(client, name, target, "rollback", f"rollback: @{alias} moved back from version {current}", _who())
    return f"{name}@{alias}: version {current} -> {target} (rollback)"


def _parse_registered(spec: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    import re

    m = re.fullmatch(r"models:/([A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@([A-Za-z0-9][A-Za-z0-9._-]{0,127})|/(\d+))", spec)
    if not m:
        raise ConfigError(f"model.init_from={spec!r}: a registered model is models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group(1), m.group(2), m.group(3)


def _model_version(spec: str, uri: str, missing_ok: bool = False):
    """(client, the model version ``spec`` names); with ``missing_ok``, (client, None) where the
    registry answers that the model, version or alias does not exist (not where it cannot answer)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = _parse_registered(spec)
    client = MlflowClient(tracking_uri=uri)
    try:
        if alias is not None:
            return client, client.get_model_version_by_alias(name, alias)
        return client, client.get_model_version(name, version)
    except MlflowException as e:
        # A missing model: RESOURCE_DOES_NOT_EXIST; a missing alias: INVALID_PARAMETER_VALUE "... not found".
        missing = e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in e.message
        if missing_ok and missing:
            return client, None
        from lm.config import display_uri

        if missing:
            raise ConfigError(f"model.init_from={spec!r} is not in the registry at {display_uri(uri)}: {e.message}") from None
        raise ConfigError(f"model.init_from={spec!r}: the registry at {display_uri(uri)} did not answer ({e.message}); "
                          "is the tracking server up?") from None


def resolve_registered(spec: str, uri: str, missing_ok: bool = False) -> dict[str, str] | None:
    """The version an alias points at now (aliases move: this is what a cache key must hold); None
    if it does not exist and ``missing_ok``."""
    _, mv = _model_version(spec, uri, missing_ok)
    if mv is None:
        return None
    return {"name": mv.name, "version": str(mv.version), "run_id": str(mv.run_id), "source": str(mv.source)}


def download_registered(spec: str, uri: str, dst: Path) -> tuple[Path, str]:
    """Download a registered lmforge model; returns (its export folder, the version)."""
    import mlflow
    import yaml

    client, mv = _model_version(spec, uri)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(mv.name, mv.version), dst_path=str(dst), tracking_uri=uri
        )
    )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifact = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get("model")
    if not artifact:
        raise ConfigError(f"model.init_from={spec!r} is not an lmforge model (its MLmodel has no 'model' artifact)")
    folder = (local / artifact["path"]).resolve()
    if not folder.is_relative_to(local.resolve()) or not (folder / "model.json").is_file():
        raise ConfigError(f"model.init_from={spec!r}: its model artifact is not an lmforge export folder")
    return folder, str(mv.version)
