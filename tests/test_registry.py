"""People moving the registry's aliases: ``lmforge promote`` and ``lmforge rollback`` on a real
MLflow sqlite store (the versions are registry entries only; promotion by the pipeline, which
needs real exports, is tested in test_pipeline.py)."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from lm.tracking.registry import DECIDED_BY_TAG, DECISION_TAG, HISTORY_TAG, REASON_TAG


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (a new one costs seconds); each test registers its own model."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture
def registry(store, request):
    """A registered model with versions 1..3 and @champion on 1, as a first deploy leaves it."""
    from mlflow.tracking import MlflowClient

    from lm.tracking.registry import _move_alias

    name = request.node.name.split("[")[0].removeprefix("test_")[:60]
    client = MlflowClient(store)
    client.create_registered_model(name)
    for i in range(3):
        client.create_model_version(name, source=f"/nowhere/{name}/{i}")
    _move_alias(client, name, "champion", "1", None)
    return Registered(client, name, f"tracking.uri={store}")


class Registered:
    def __init__(self, client, name: str, uri: str):
        self.client, self.name, self.uri = client, name, uri

    def champion(self, alias: str = "champion") -> str:
        return str(self.client.get_model_version_by_alias(self.name, alias).version)

    def history(self, alias: str = "champion") -> list[str]:
        return json.loads(self.client.get_registered_model(self.name).tags[HISTORY_TAG.format(alias=alias)])

    def tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(self.name, version).tags


def test_promote_and_rollback_move_the_alias_and_record_who_and_why(registry, capsys):
    r = registry
    assert main(["promote", r.name, "3", r.uri]) == 0
    assert r.champion() == "3" and r.history() == ["1", "3"]
    tags = r.tags("3")
    assert tags[DECISION_TAG] == "manual promote" and "from version 1" in tags[REASON_TAG]
    assert "@" in tags[DECIDED_BY_TAG] and tags["lmforge.decided_at"]
    assert "version 1 -> 3" in capsys.readouterr().out

    assert main(["promote", r.name, "2", r.uri]) == 0
    assert main(["rollback", r.name, r.uri]) == 0
    assert r.champion() == "3" and r.history() == ["1", "3"]
    assert r.tags("3")[DECISION_TAG] == "rollback"
    assert main(["rollback", r.name, r.uri]) == 0
    assert r.champion() == "1" and r.history() == ["1"]
    assert "from version 3" in r.tags("1")[REASON_TAG]

    capsys.readouterr()
    assert main(["rollback", r.name, r.uri]) == 2
    assert capsys.readouterr().err == (
        f"lmforge: error: {r.name}@champion: no earlier version to roll back to (held now by version 1)\n"
    )
    assert r.champion() == "1"


def test_an_alias_moved_outside_lmforge_is_rolled_back_to_the_version_it_replaced(registry):
    r = registry
    r.client.set_registered_model_alias(r.name, "champion", "2")  # by hand in MLflow's UI: no history entry
    assert main(["promote", r.name, "3", r.uri]) == 0
    assert r.history() == ["1", "2", "3"]
    assert main(["rollback", r.name, r.uri]) == 0
    assert r.champion() == "2"


def test_another_alias_keeps_its_own_history(registry):
    r = registry
    # Overrides before options: argparse takes positionals in one run.
    assert main(["promote", r.name, "2", r.uri, "--alias", "staging"]) == 0
    assert r.champion("staging") == "2" and r.history("staging") == ["2"]
    assert r.champion() == "1" and r.history() == ["1"]


def test_unknown_models_and_versions_are_one_line_errors(registry, capsys):
    r = registry
    for argv, message in [
        (["promote", "nope", "1"], "no registered model 'nope' at sqlite:///"),
        (["promote", r.name, "9"], f"{r.name} has no version '9' at sqlite:///"),
        (["rollback", "nope"], "no registered model 'nope' at sqlite:///"),
    ]:
        assert main([*argv, r.uri]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lmforge: error: {message}") and err.count("\n") == 1, err


def test_rollback_of_a_model_whose_alias_never_moved_is_a_one_line_error(store, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    client.create_registered_model("fresh")
    client.create_model_version("fresh", source="/nowhere/fresh")
    capsys.readouterr()
    assert main(["rollback", "fresh", f"tracking.uri={store}"]) == 2
    assert capsys.readouterr().err == (
        "lmforge: error: fresh@champion: no earlier version to roll back to (no version holds it now)\n"
    )


def test_the_tracking_uri_comes_from_the_environment(registry, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main(["promote", registry.name, "2"]) == 0
    assert registry.champion() == "2"


def test_challenger_is_not_a_deploy_alias():
    from lm.config import load_config
    from lm.errors import ConfigError

    with pytest.raises(ConfigError, match="challenger"):
        load_config(None, ["deploy.alias=challenger"])
    with pytest.raises(ConfigError, match="promote_margin"):
        load_config(None, ["deploy.promote_margin=-0.1"])
