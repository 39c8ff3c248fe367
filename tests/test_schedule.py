"""Scheduled retraining: the deployments as registered on a Prefect server, and what counts as new data."""

from __future__ import annotations

import time

import pytest

from lm.config import load_config


@pytest.mark.slow  # a few seconds, plus the session's Prefect test server
def test_deployments_carry_the_config_as_a_form_and_run_one_at_a_time(prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.deployments import deployments
    from lm.config import Config
    from lm.stages import STAGES

    cfg = load_config("tiny", ["pretrain.max_steps=5", "retrain.check_every_s=60"])
    ids = {d.name: d.apply() for d in deployments(cfg, "0 3 * * *")}
    assert set(ids) == {"retrain", "watch", *(s.command for s in STAGES)}
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(ids["retrain"])
        schedules = client.read_deployment_schedules(ids["retrain"])
        tokenize = client.read_deployment(ids["tokenize"])
        watch_schedules = client.read_deployment_schedules(ids["watch"])
    assert stored.name == "retrain" and stored.entrypoint == "flows/pipeline.py:pipeline"
    # The resolved config is the deployment's parameter, and loads back to the same config.
    assert Config.model_validate(stored.parameters["config"]) == cfg
    assert stored.parameters["targets"] is None and stored.parameters["trigger"] == "manual"
    # Its schema is the config's: the Prefect UI renders it as a form, section by section, and the
    # trigger as a choice.
    schema = stored.parameter_openapi_schema
    assert "config" in schema["properties"] and "retrain" in str(schema["definitions"]["Config"])
    assert schema["properties"]["trigger"]["enum"] == ["manual", "schedule", "new-data"]
    assert [s.schedule.cron for s in schedules] == ["0 3 * * *"]
    assert stored.global_concurrency_limit is not None and stored.global_concurrency_limit.limit == 1
    # A stage's deployment runs that stage (and what it reads); the check runs on its interval.
    assert tokenize.parameters["targets"] == ["tokenize"]
    assert tokenize.global_concurrency_limit.limit == 1
    assert [s.schedule.interval.total_seconds() for s in watch_schedules] == [60]


def test_new_data_is_counted_by_content_against_what_ingest_read(tmp_path):
    from lm.config import RetrainConfig
    from lm.pipeline.retrain import data_digest, new_data, source_digests

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha " * 100)
    (corpus / "b.txt").write_text("beta " * 100)
    cfg = load_config("tiny", [f"data.sources=[{corpus}]"])
    before = source_digests(cfg.data)
    seen = {path: d.sha256 for path, d in before.items()}  # as provenance.csv has them
    assert not new_data(before, seen).files

    (corpus / "b.txt").write_text("beta, changed " * 100)
    (corpus / "c.txt").write_text("gamma " * 10_000)
    (corpus / "a.txt").touch()  # a newer mtime is no new data: contents are compared
    after = source_digests(cfg.data)
    new = new_data(after, seen)
    assert [p.rsplit("/", 1)[1] for p in new.files] == ["b.txt", "c.txt"]
    assert new.bytes == (corpus / "b.txt").stat().st_size + (corpus / "c.txt").stat().st_size
    assert data_digest(after, cfg.data) != data_digest(before, cfg.data)

    assert new.enough(RetrainConfig(min_new_files=2))
    assert not new.enough(RetrainConfig(min_new_files=3))
    assert not new.enough(RetrainConfig(min_new_mb=1.0))  # both thresholds must hold


def test_data_digest_follows_contents_not_times_and_config_digest_every_key(tmp_path):
    from lm.pipeline.retrain import config_digest, data_digest, source_digests

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha " * 100)
    cfg = load_config("tiny", [f"data.sources=[{corpus}]"])
    first = data_digest(source_digests(cfg.data), cfg.data)
    (corpus / "a.txt").write_text("alpha " * 100)  # rewritten, same bytes
    assert data_digest(source_digests(cfg.data), cfg.data) == first
    assert config_digest(cfg) == config_digest(load_config("tiny", [f"data.sources=[{corpus}]"]))
    assert config_digest(cfg) != config_digest(load_config("tiny", [f"data.sources=[{corpus}]", "retrain.min_new_mb=1"]))


def test_trigger_without_a_reachable_server_is_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    for api, needle in ((None, "PREFECT_API_URL is not set"), ("http://127.0.0.1:9/api", "no Prefect server answers")):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "trigger", "retrain"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={**env, "PYTHONPATH": str(root), **({"PREFECT_API_URL": api} if api else {})})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_source_digests_are_cached_by_stat_and_a_file_written_in_place_is_read_again(tmp_path, monkeypatch):
    import os

    from lm.pipeline import retrain
    from lm.pipeline.retrain import source_digests

    corpus, cache = tmp_path / "corpus", tmp_path / "w" / retrain.DIGEST_CACHE
    corpus.mkdir()
    for name in "abc":
        (corpus / f"{name}.txt").write_text(f"{name} " * 1000)
        os.utime(corpus / f"{name}.txt", ns=(10**18, 10**18))  # settled long ago (ctime stays now)
    cfg = load_config("tiny", [f"data.sources=[{corpus}]"])
    hashed: list[str] = []
    real = retrain.file_sha256
    monkeypatch.setattr(retrain, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))

    first = source_digests(cfg.data, cache)
    assert sorted(hashed) == ["a.txt", "b.txt", "c.txt"] and not cache.exists()  # changed just now: not cached
    time.sleep(2.1)
    hashed.clear()
    assert source_digests(cfg.data, cache) == first and len(hashed) == 3 and cache.is_file()
    hashed.clear()
    assert source_digests(cfg.data, cache) == first and hashed == []  # nothing read again
    # b rewritten in place with the same size, its modification time put back: its change time tells.
    (corpus / "b.txt").write_text("B " * 1000)
    os.utime(corpus / "b.txt", ns=(10**18, 10**18))
    hashed.clear()
    after = source_digests(cfg.data, cache)
    assert hashed == ["b.txt"] and after[str(corpus / "b.txt")].sha256 != first[str(corpus / "b.txt")].sha256
    cache.write_text("{not json")  # a damaged cache costs a rehash, not an error
    hashed.clear()
    assert source_digests(cfg.data, cache) == after and len(hashed) == 3
    cache.write_text("[1, 2]")  # so does JSON that is not a cache
    hashed.clear()
    assert source_digests(cfg.data, cache) == after and len(hashed) == 3
