"""Every constrained key of the config schema, read off the schema itself: a value just outside what
the key allows (a bound, a choice, a name pattern) is refused in one line that names the key, from
a YAML file and from the command line. A key added to the schema later is covered without a new case.
"""

from __future__ import annotations

import typing
from pathlib import Path

import annotated_types as at
import pytest
from pydantic import BaseModel

from lm.config import Config, load_config
from lm.errors import LmforgeError


def _outside(field) -> str | None:
    """A value the field refuses, as a command-line override would write it; None if unconstrained."""
    ann = field.annotation
    if typing.get_origin(ann) is typing.Literal:
        return "not-one-of-the-choices"
    for m in field.metadata:
        if isinstance(m, at.Ge):
            return str(m.ge - 1)
        if isinstance(m, at.Gt):
            return str(m.gt)
        if isinstance(m, at.Le):
            return str(m.le + 1)
        if isinstance(m, at.Lt):
            return str(m.lt)
        if getattr(m, "pattern", None):
            return "a name with spaces/and slashes"
    return None


def constrained_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, a value outside its constraint) for every constrained leaf of the schema."""
    found = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found += constrained_keys(ann, f"{prefix}{name}.")
        elif (bad := _outside(field)) is not None:
            found.append((f"{prefix}{name}", bad))
    return found


KEYS = constrained_keys()


def test_the_schema_walk_sees_the_constrained_keys():
    keys = dict(KEYS)
    # A few known ones, one of each kind: a lower bound, an open interval, a choice, a name pattern.
    assert keys["pretrain.batch_size"] == "0" and keys["finetune.val_fraction"] == "0"
    assert keys["deploy.promote_mode"] == "not-one-of-the-choices"
    assert keys["deploy.model_name"] == "a name with spaces/and slashes"
    assert len(keys) >= 60


@pytest.mark.parametrize("key,bad", KEYS, ids=[k for k, _ in KEYS])
def test_a_value_outside_a_key_s_constraint_is_refused_naming_the_key(key, bad, tmp_path: Path):
    with pytest.raises(LmforgeError) as on_the_command_line:
        load_config("tiny", [f"{key}={bad}"])
    *sections, leaf = key.split(".")
    yaml = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {bad}\n"
    (tmp_path / "bad.yaml").write_text(yaml)
    with pytest.raises(LmforgeError) as in_a_file:
        load_config(str(tmp_path / "bad.yaml"), [])
    for error in (on_the_command_line.value, in_a_file.value):
        message = str(error)
        assert f"key '{key}'" in message, message
        assert "\n" not in message and "Traceback" not in message
