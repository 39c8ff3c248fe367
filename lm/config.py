"""Typed configuration: YAML presets in ``conf/`` plus ``section.key=value`` overrides.

The schema lives here and only here; ``conf/*.yaml`` only set values. Unknown keys and wrong
types are rejected at load time with an error that names the key and the file, so a typo never
silently falls back to a default half-way through a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lm.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PACKAGE_ROOT / "conf"
DEFAULT_CONFIG = CONF_DIR / "default.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI if set, else MLflow 3's embedded default sqlite:///mlflow.db.
    uri: str | None = None
    experiment: str = "lmforge"


class CleanConfig(Section):
    """Thresholds of the cleaning filters; ``preset`` picks defaults that suit prose or code."""

    preset: Literal["prose", "code"] = "prose"
    normalize_unicode: bool = True
    min_chars: int = 200
    max_chars: int = 200_000
    # Gopher-style quality rules (Rae et al. 2021, appendix A); None switches a rule off.
    # Unset thresholds take the preset's value (CLEAN_PRESETS below).
    min_mean_word_len: float | None = None
    max_mean_word_len: float | None = None
    max_symbol_ratio: float | None = None
    min_alpha_ratio: float | None = None
    max_dup_line_fraction: float | None = None
    max_top_ngram_fraction: float | None = None
    # Code-corpus rules (Chen et al. 2021 "Codex"; Li et al. 2023 "StarCoder"): minified or
    # generated files have very long lines and few alphanumeric characters.
    max_line_len: int | None = None
    max_mean_line_len: float | None = None
    min_alnum_ratio: float | None = None
    redact_pii: bool = True
    dropped_samples: int = 5  # dropped documents kept per reason in dropped_samples.jsonl

    @model_validator(mode="after")
    def _apply_preset(self) -> CleanConfig:
        # Every threshold the config did not set takes the preset's value, here at validation, so
        # that a dumped and re-validated config (Prefect parameters, stage keys) keeps the same
        # values. Written to __dict__ so that the fields still count as unset: assigning another
        # preset later re-fills them.
        for name, value in CLEAN_PRESETS[self.preset].items():
            if name not in self.model_fields_set:
                self.__dict__[name] = value
        return self


# Thresholds per preset. prose: Gopher's published values (Rae et al. 2021, A.1.1). code: the
# Codex/StarCoder line-length and alphanumeric rules; word-length and symbol rules are meaningless
# for code (``#`` starts every Python comment) and repeated lines are normal in it.
CLEAN_PRESETS: dict[str, dict[str, Any]] = {
    "prose": {
        "min_chars": 200,
        "max_chars": 200_000,
        "min_mean_word_len": 3.0,
        "max_mean_word_len": 10.0,
        "max_symbol_ratio": 0.1,
        "min_alpha_ratio": 0.8,
        "max_dup_line_fraction": 0.3,
        "max_top_ngram_fraction": 0.2,
        "max_line_len": None,
        "max_mean_line_len": None,
        "min_alnum_ratio": None,
    },
    "code": {
        "min_chars": 100,
        "max_chars": 1_000_000,
        "min_mean_word_len": None,
        "max_mean_word_len": None,
        "max_symbol_ratio": None,
        "min_alpha_ratio": None,
        "max_dup_line_fraction": 0.5,
        "max_top_ngram_fraction": None,
        "max_line_len": 1000,
        "max_mean_line_len": 100.0,
        "min_alnum_ratio": 0.25,
    },
}


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    # MinHash-LSH (Broder 1997; Leskovec et al., MMDS ch. 3): word shingles of this size.
    shingle_size: int = 5
    num_perm: int = 128
    threshold: float = 0.8


class DataConfig(Section):
    # Paths, globs, directories, or the word ``stdlib`` (the Python standard library's sources and
    # pydoc topics: a real corpus every Python installation carries, so the demo runs offline).
    sources: list[str] = Field(default_factory=lambda: ["stdlib"])
    text_field: str = "text"  # field of .jsonl records and column of .csv/.parquet tables
    max_bad_fraction: float = 0.01  # malformed JSONL lines tolerated before the stage fails
    max_docs: int | None = None  # cap on ingested documents (quick runs); None = all
    val_fraction: float = 0.05
    seed: int = 0
    workers: int | None = None  # processes for cleaning/tokenizing; None = all cores
    dask_address: str | None = None  # tcp://host:8786 to run the data stage on a Dask cluster
    stdlib_tests: bool = True  # include the stdlib's own test suites (about 19 of its 31 MB)
    row_group_mb: float = 4.0  # documents per parquet row group: the unit of parallel work
    # A longer document (a big text file, a huge record) is cut at line breaks into pieces of at most
    # this many characters (ids name#1, name#2 ...): what one document costs in memory is bounded.
    max_doc_chars: int = Field(default=1_000_000, ge=1000)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)


class TokenizerConfig(Section):
    kind: Literal["bpe", "byte", "file"] = "bpe"
    vocab_size: int = 8192
    path: str | None = None  # tokenizer.json, for kind=file
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>", "<|pad|>", "<|mask|>"])
    # BPE merges are learned from at most this much training text (deterministic prefix); None = all.
    train_max_mb: float | None = 64.0
    shard_tokens: int = 100_000_000  # tokens per .bin shard file

    @model_validator(mode="after")
    def _file_needs_path(self) -> TokenizerConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind=file needs tokenizer.path (a tokenizer.json)")
        return self


class ModelConfig(Section):
    kind: Literal["decoder", "encoder"] = "decoder"
    # Named size from lm.model.PRESETS; explicit keys below override the preset's values.
    preset: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None  # < n_head: grouped-query attention (Ainslie et al. 2023)
    d_model: int | None = None
    d_ff: int | None = None  # None: SwiGLU's usual 8/3 * d_model, rounded up to a multiple of 64
    seq_len: int = 256
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10_000.0


class PretrainConfig(Section):
    max_steps: int = 1000
    batch_size: int = 16  # sequences per device per micro-batch
    tokens_per_step: int | None = None  # gradient accumulation reaches this; None = one micro-batch
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 1337
    val_every: int = 100
    val_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    resume: str = "auto"  # auto | never | path to a checkpoint
    init_from: str | None = None  # a checkpoint or exported model folder to continue from
    compile: bool = False
    mlm_probability: float = 0.15  # encoder only (Devlin et al. 2019)
    sample_every: int | None = None  # steps between logged sample generations; None = at validation


class FinetuneConfig(Section):
    task: Literal["classify", "sft"] = "classify"
    # ``stdlib``: a labelled task derived from the same corpus (docstring -> stdlib package);
    # else a .csv/.jsonl/.parquet file with text_column and label_column.
    data: str = "stdlib"
    text_column: str = "text"
    label_column: str = "label"
    num_classes: int = 8  # for the stdlib task: the most frequent packages
    max_steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    seed: int = 1337
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    freeze_backbone: bool = False


class TrainerConfig(Section):
    accelerator: str = "auto"
    strategy: str = "auto"  # auto | ddp | fsdp | any Lightning strategy name
    devices: int | str = 1
    num_nodes: int = 1
    precision: str = "32-true"
    log_every: int = 10


class EvaluateConfig(Section):
    max_batches: int = 50


class DeployConfig(Section):
    model_name: str = "lmforge-demo"
    alias: str = "champion"
    # The metric that decides promotion; the new version takes the alias only if it is better.
    promote_metric: str = "eval/accuracy"


class Config(Section):
    name: str = "lmforge"
    workdir: str = "runs"
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    def digest(self, *sections: str) -> str:
        """Stable hash of the named sections (all if none): the cache key of stage outputs."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def tracking_uri(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as YAML (``[a,b]``, ``3``, ``true``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' in {source}: remove it or check its spelling")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"key '{key}' in {source}: {e['msg']}{got_s}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (default ``conf/default.yaml``), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        candidate = CONF_DIR / f"{path}.yaml" if path.suffix == "" else CONF_DIR / path.name
        if candidate.is_file() and not path.is_absolute():
            path = candidate
        else:
            raise ConfigError(f"config file {path} does not exist (presets: {', '.join(list_presets())})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(tree).__name__}")
    for item in overrides:
        keys, value = parse_override(item)
        _set(tree, keys, value)
    source = f"{path}" + (" (with command-line overrides)" if overrides else "")
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
