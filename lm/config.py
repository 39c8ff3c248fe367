"""Typed configuration: YAML presets in ``conf/`` plus ``section.key=value`` overrides.

The schema lives here and only here; ``conf/*.yaml`` only set values. Unknown keys and wrong
types are rejected at load time with an error that names the key and the file, so a typo never
silently falls back to a default half-way through a run.
"""

from __future__ import annotations

import copy
import math
import os
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lm.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PACKAGE_ROOT / "conf"
DEFAULT_CONFIG = CONF_DIR / "default.yaml"


class Section(BaseModel):
    # Frozen: the config is parsed once and handed to every stage; nothing changes it on the way.
    # (``model_copy(update=...)`` makes a changed copy where a test or benchmark needs one.)
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI if set, else MLflow 3's embedded default sqlite:///mlflow.db.
    uri: str | None = None
    experiment: str = "lmforge"

    @field_validator("uri")
    @classmethod
    def _no_password(cls, uri: str | None) -> str | None:
        # A config is recorded (run params, config.yaml artifacts, Prefect parameters): no secret in it.
        if uri and "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
            netloc = uri.split("://", 1)[1].split("/", 1)[0]
            if ":" in netloc.rsplit("@", 1)[0]:
                raise ValueError(
                    "tracking.uri holds a password, and the config is recorded with every run: set the URI in "
                    "MLFLOW_TRACKING_URI, or the password in MLFLOW_TRACKING_PASSWORD (the environment is never recorded)"
                )
        return uri


class CleanConfig(Section):
    """Thresholds of the cleaning filters; ``preset`` picks defaults that suit prose or code."""

    preset: Literal["prose", "code"] = "prose"
    normalize_unicode: bool = True
    # Every threshold below that the config leaves out takes the preset's value (CLEAN_PRESETS), so
    # the loaded config holds the values in force. None switches a rule off.
    min_chars: int = 200
    max_chars: int = 200_000
    # Gopher-style quality rules (Rae et al. 2021, appendix A).
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

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "prose")
        if preset not in CLEAN_PRESETS:
            return data  # the field's own validation names the allowed values
        return {**CLEAN_PRESETS[preset], **data}


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
    sources: list[str] = Field(default_factory=lambda: ["stdlib"], min_length=1)
    text_field: str = "text"  # field of .jsonl records and column of .csv/.parquet tables
    # Malformed JSONL lines tolerated before the stage fails.
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    # Source files with bytes that are not UTF-8 (decoded with U+FFFD) tolerated, as a fraction of
    # all files: past it the corpus is most likely in another encoding, and ingest stops.
    max_invalid_utf8_fraction: float = Field(0.5, ge=0, le=1)
    max_docs: int | None = Field(None, ge=1)  # cap on ingested documents (quick runs); None = all
    val_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    workers: int | None = Field(None, ge=1)  # processes for cleaning/tokenizing; None = all cores
    dask_address: str | None = None  # tcp://host:8786 to run the data stage on a Dask cluster
    stdlib_tests: bool = True  # include the stdlib's own test suites (about 19 of its 31 MB)
    row_group_mb: float = Field(4.0, gt=0)  # documents per parquet row group: the unit of parallel work
    # A longer document (a big text file, a huge record) is cut at line breaks into pieces of at most
    # this many characters (ids name#1, name#2 ...): what one document costs in memory is bounded.
    max_doc_chars: int = Field(default=1_000_000, ge=1000)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)


BYTE_VOCAB = 256  # byte-level tokenizers: one token per byte value, plus the special tokens
# End of text, padding, the MLM mask, then the two that delimit a chat turn (ChatML) in the chat
# template the tokenize stage stores with the tokenizer (instruction tuning).
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>", "<|im_start|>", "<|im_end|>")


class TokenizerConfig(Section):
    kind: Literal["bpe", "byte", "file"] = "bpe"
    # bpe: the vocabulary to learn. byte: always 256 + the special tokens. file: the file's own
    # (None here; the tokenize stage logs the size it found).
    vocab_size: int | None = 8192
    path: str | None = None  # tokenizer.json, for kind=file
    # The first is the end-of-text token, the second padding, the third the MLM mask; the chat
    # template (lm.text.tokenize_stage) uses <|im_start|> and <|im_end|> when they are here.
    special_tokens: list[str] = Field(default_factory=lambda: list(SPECIAL_TOKENS), min_length=1)
    # BPE merges are learned from at most this much training text (deterministic prefix); None = all.
    train_max_mb: float | None = Field(64.0, gt=0)
    shard_tokens: int = Field(100_000_000, ge=1)  # tokens per .bin shard file

    @model_validator(mode="before")
    @classmethod
    def _vocab_of_kind(cls, data: Any) -> Any:
        # Only bpe learns a vocabulary of the configured size; the config says what the others have.
        if isinstance(data, dict) and data.get("kind") == "file":
            data = {**data, "vocab_size": None}
        elif isinstance(data, dict) and data.get("kind") == "byte":
            specials = data.get("special_tokens", SPECIAL_TOKENS)
            if isinstance(specials, list | tuple):
                data = {**data, "vocab_size": BYTE_VOCAB + len(specials)}
        return data

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind=file needs tokenizer.path (a tokenizer.json)")
        if self.kind == "bpe":
            least = BYTE_VOCAB + len(self.special_tokens)
            if self.vocab_size is None or self.vocab_size < least:
                raise ValueError(
                    f"tokenizer.vocab_size={self.vocab_size} is too small for byte-level BPE: it needs at least "
                    f"{BYTE_VOCAB} byte tokens + {len(self.special_tokens)} special tokens = {least}"
                )
        return self


# Named model sizes; explicit model.* keys override a preset's values. seq_len comes from model.seq_len.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # ~0.2M parameters + embeddings: unit tests.
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=192),
    # ~5M with an 8k vocabulary: the CPU demo (minutes on a laptop).
    "small": dict(n_layer=4, n_head=4, n_kv_head=4, d_model=256, d_ff=704),
    # GPT-2 small's shape (Radford et al. 2019): 124M with GPT-2's 50k vocabulary and tied embeddings.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048),
    # Llama-3.2-1B's shape (16 layers, d 2048, GQA 32/8, d_ff 8192): ~1B with a 32k-64k vocabulary.
    "1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192),
}


def swiglu_hidden(d_model: int) -> int:
    """LLaMA keeps the MLP's parameter count of a 4x GELU MLP: 2/3 * 4d, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class ModelConfig(Section):
    kind: Literal["decoder", "encoder"] = "decoder"
    # Where the network starts. None: the pipeline's own pretraining, from scratch. Else an
    # existing model, whose architecture and tokenizer are then used (the dimensions below and the
    # tokenizer section are ignored): a registered model (models:/NAME@ALIAS, models:/NAME/VERSION),
    # an lmforge export folder, a local Hugging Face folder (Llama decoder or BERT encoder, as
    # save_pretrained writes it), or a .ckpt/model folder of the configured shape. Pretraining is
    # then skipped unless pretrain.enabled=true (continued pretraining).
    init_from: str | None = None
    # When init_from names a registered model that does not exist yet (models:/NAME@champion before
    # the first model was promoted): "error" stops the run; "scratch" pretrains from scratch, so the
    # first run of a retrain loop that warm-starts from its champion trains the first champion.
    init_from_fallback: Literal["error", "scratch"] = "error"
    # A named size (MODEL_PRESETS) fills the dimensions the config leaves out; the loaded config
    # holds every dimension in force.
    preset: str | None = None
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    # < n_head: grouped-query attention (Ainslie et al. 2023); None = n_head.
    n_kv_head: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=1)
    d_ff: int | None = Field(None, ge=1)  # None: SwiGLU's usual 8/3 * d_model, rounded up to a multiple of 64
    seq_len: int = Field(256, ge=1)
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    rope_theta: float = Field(10_000.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_dimensions(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = data.get("preset")
        if preset is not None:
            if preset not in MODEL_PRESETS:
                raise ValueError(
                    f"model.preset={preset!r} is unknown: choose one of {', '.join(MODEL_PRESETS)}"
                )
            for key, value in MODEL_PRESETS[preset].items():
                if data.get(key) is None:
                    data[key] = value
        # Derived from a valid value only: a bad n_head or d_model is said once, under its own key.
        if data.get("n_kv_head") is None and _positive_int(data.get("n_head")):
            data["n_kv_head"] = data["n_head"]
        if data.get("d_ff") is None and _positive_int(data.get("d_model")):
            data["d_ff"] = swiglu_hidden(data["d_model"])
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        for key in ("n_layer", "n_head", "d_model"):
            if getattr(self, key) is None:
                raise ValueError(
                    f"model.{key} is not set: pick model.preset ({', '.join(MODEL_PRESETS)}) or set model.{key}"
                )
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dim d_model/n_head={self.d_model // self.n_head} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}"
            )
        return self


class TrainingConfig(Section):
    """What pretraining and fine-tuning share: steps, batches, the optimiser and its schedule,
    checkpoints, resume. Each stage has its own block of this type, so fine-tuning never reads
    pretraining's settings."""

    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)  # sequences per device per micro-batch
    # Gradient accumulation reaches this; None = one micro-batch.
    tokens_per_step: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0: no clipping
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = Field(1337, ge=0, lt=2**32)  # what seed_everything accepts
    val_every: int = Field(100, ge=1)
    ckpt_every: int = Field(200, ge=1)
    keep_last: int = Field(2, ge=1)
    resume: str = "auto"  # auto | never | path to a checkpoint
    compile: bool = False


class PretrainConfig(TrainingConfig):
    # None: pretrain from scratch, or skip pretraining when model.init_from names a model; true with
    # model.init_from: continue pretraining that model on this corpus.
    enabled: bool | None = None
    val_batches: int = Field(20, ge=1)
    mlm_probability: float = Field(0.15, gt=0, lt=1)  # encoder only (Devlin et al. 2019)
    # Steps between logged sample generations; None = at validation.
    sample_every: int | None = Field(None, ge=1)


class LoraConfig(Section):
    """Low-rank adapters (Hu et al. 2021, "LoRA"), applied by peft; merged into the weights on save."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    # 4bit: QLoRA (Dettmers et al. 2023): the frozen base held in 4-bit NF4 by bitsandbytes, adapters
    # trained on top; needs a CUDA GPU and `pip install 'lmforge[gpu]'`.
    quantize: Literal["none", "4bit"] = "none"

    @model_validator(mode="after")
    def _quantize_needs_adapters(self) -> LoraConfig:
        if self.quantize != "none" and not self.enabled:
            raise ValueError(
                "finetune.lora.quantize=4bit holds the base in 4 bits under LoRA adapters: set finetune.lora.enabled=true too"
            )
        return self


class MethodConfig(Section):
    """The settings of one fine-tuning method: a block under ``finetune`` named for the method, which
    ``finetune.task`` picks (``lm.finetune.METHODS`` has its module under the same name)."""


class ClassifyConfig(MethodConfig):
    """``finetune.classify``: a linear head on the pretrained backbone (lm.finetune.classify)."""

    text_column: str = "text"  # columns of a labelled .csv/.jsonl/.parquet finetune.data
    label_column: str = "label"
    num_classes: int = Field(8, ge=2)  # for finetune.data=stdlib: the most frequent packages
    freeze_backbone: bool = False  # train the head alone


class SFTConfig(MethodConfig):
    """``finetune.sft``: instruction tuning of a decoder (lm.finetune.sft, lm.data.instruct)."""

    # How the records of finetune.data (and evaluate.data) are read: auto detects it from the keys
    # (lm.data.conversations); messages: chat messages; prompt_response: the two columns below;
    # alpaca: instruction, optional input, output; sharegpt: conversations of {from, value}.
    format: Literal["auto", "messages", "prompt_response", "alpaca", "sharegpt"] = "auto"
    prompt_column: str = "prompt"  # prompt/response pairs ...
    response_column: str = "response"
    messages_column: str = "messages"  # ... or chat messages [{role, content}, ...] (used when present)
    system_prompt: str | None = None  # a system message put before every conversation without one
    # Several short examples share one window (attention never crosses an example's boundary).
    packing: bool = False
    # Which tokens the loss learns: every assistant turn; only the last one (earlier turns are
    # context); or every token of the conversation, prompts and template markers included.
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"


class DataSource(Section):
    """One source of a mix (``finetune.data`` given as a list): a path (file, folder, glob) and
    how much of its training split to train on (lm.data.instruct: round(weight x examples))."""

    path: str
    weight: float = Field(1.0, gt=0)


def _sources_of(value: Any) -> Any:
    """A list of sources, each validated here so that a bad one is named by its place; a plain path
    in the list stands for {path: it} ([a.jsonl, b.json] mixes the two at weight 1)."""
    if not isinstance(value, list):
        return value
    if not value:
        raise ValueError("the list of sources is empty: give a path, or a list of {path, weight}")
    sources = []
    for n, item in enumerate(value, 1):
        try:
            sources.append(DataSource.model_validate({"path": item} if isinstance(item, str) else item))
        except ValidationError as e:
            first = e.errors()[0]
            where = "".join(f"{p}: " for p in first["loc"])
            raise ValueError(f"source {n} ({item!r}): {where}{first['msg']}") from None
    return sources


class DPOConfig(MethodConfig):
    """``finetune.dpo``: preference tuning of a decoder on (prompt, chosen, rejected) pairs
    (lm.finetune.dpo, lm.data.preference). The reference is the starting model."""

    # sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. 2023), on log-ratios averaged per token.
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # DPO: how far the tuned model may move from the reference (higher: less); IPO: its tau.
    beta: float = Field(0.1, gt=0)
    # Conservative DPO (Mitchell 2023): the share of preference labels taken to be flipped.
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    prompt_column: str = "prompt"  # text or chat messages; may be absent when chosen/rejected are whole conversations
    chosen_column: str = "chosen"  # text, or messages (the whole conversation, or the reply alone)
    rejected_column: str = "rejected"
    system_prompt: str | None = None  # a system message put before every prompt without one

    @model_validator(mode="after")
    def _smoothing_is_dpo_only(self) -> DPOConfig:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError(
                "finetune.dpo.label_smoothing is conservative DPO's (loss=sigmoid); IPO's squared loss has no "
                "labels to smooth: set finetune.dpo.label_smoothing=0 or finetune.dpo.loss=sigmoid"
            )
        return self


class FinetuneConfig(TrainingConfig):
    # The fine-tuning method: the name of one of the method blocks below.
    task: str = "classify"
    # ``stdlib``: a task derived from the same corpus (classify: docstring -> stdlib package;
    # sft: a function's signature and a question -> its docstring's summary line);
    # else a .csv/.jsonl/.parquet file with the columns its method block names (sft: also .json,
    # .gz, a folder, a glob, a datasets save_to_disk folder, or a list of sources with weights).
    data: str | list[DataSource] = "stdlib"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    # Fine-tuning's own defaults (a pretrained network needs fewer, gentler steps).
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    # One block per method, read only by that method.
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        """The values ``finetune.task`` may take: the names of the method blocks."""
        return tuple(
            name
            for name, field in cls.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, MethodConfig)
        )

    @field_validator("data", mode="before")
    @classmethod
    def _data_sources(cls, value: Any) -> Any:
        return _sources_of(value)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        if task not in cls.methods():
            raise ValueError(f"finetune.task={task!r} is not available: choose one of {', '.join(cls.methods())}")
        return task

    @model_validator(mode="after")
    def _check_fractions(self) -> FinetuneConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"finetune.val_fraction + finetune.test_fraction = {self.val_fraction + self.test_fraction} "
                "leaves nothing to train on: keep their sum below 1"
            )
        return self


class AlignConfig(FinetuneConfig):
    """``align``: a second fine-tuning step after ``finetune`` (instruction tuning, then preference
    tuning), from the first step's weights: the same settings as ``finetune``, with values of its own
    (``align.dpo.beta``, ``align.data``, ``align.lr`` ...). No task (the default): no second step."""

    task: str | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | None) -> str | None:
        if task is not None and task not in cls.methods():
            raise ValueError(f"align.task={task!r} is not available: choose one of {', '.join(cls.methods())}, or leave it unset")
        return task


def method_key(key: str) -> str | None:
    """Where a method's setting given directly under ``finetune`` now lives (``finetune.text_column``
    -> ``finetune.classify.text_column``), or None when ``key`` is no method's setting."""
    section, _, name = key.partition(".")
    if section != "finetune" or "." in name:
        return None
    for method in FinetuneConfig.methods():
        if name in FinetuneConfig.model_fields[method].annotation.model_fields:
            return f"finetune.{method}.{name}"
    return None


class TrainerConfig(Section):
    accelerator: str = "auto"
    strategy: str = "auto"  # auto | ddp | fsdp | any Lightning strategy name
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    precision: str = "32-true"
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _fsdp_needs_gpus(self) -> TrainerConfig:
        if self.strategy == "fsdp" and self.accelerator == "cpu":
            raise ValueError(
                "trainer.strategy=fsdp needs GPUs (trainer.accelerator=cuda or auto); on CPU use ddp"
            )
        return self


JUDGE_PROMPT = (
    "Two assistants answered the same question. Decide which answer is better: correct, helpful and to the "
    "point. The reference answer shows what a good answer says; an answer need not repeat its words. Neither "
    "the order of the answers nor their length is a reason to prefer one.\n\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\n"
    "Answer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n"
    "Explain your choice in one or two sentences, then give your verdict on the last line, exactly one of: "
    "[[A]] (A is better), [[B]] (B is better), [[tie]] (equally good or equally bad)."
)
JUDGE_FIELDS = {"question", "answer_a", "answer_b"}  # the prompt must hold them; {reference} is optional


class JudgeConfig(Section):
    """sft: a judged win rate of the tuned model over the model before tuning, by any OpenAI-compatible
    chat completions endpoint (``lm.finetune.judge``)."""

    url: str | None = Field(None, pattern=r"^https?://\S+$")  # the API's base URL (.../v1); unset: no judge
    model: str | None = None  # the judge model's name at that endpoint
    # The NAME of the environment variable that holds the API key (the key never goes in a config,
    # which is recorded with every run); unset: no key is sent.
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # {question}, {answer_a}, {answer_b} and, optionally, {reference}; literal braces doubled ({{ }}).
    prompt: str = JUDGE_PROMPT
    max_pairs: int = Field(32, ge=1)  # the first generated answers of each scored split that are judged
    max_tokens: int = Field(256, ge=1)  # the judge's reply
    timeout_s: float = Field(60.0, gt=0)  # per request

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, prompt: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
        except ValueError as e:
            raise ValueError(f"{e}: write a literal brace twice ({{{{ or }}}})") from None
        if missing := JUDGE_FIELDS - fields:
            raise ValueError(f"the prompt must contain {', '.join('{' + f + '}' for f in sorted(missing))}")
        if unknown := fields - JUDGE_FIELDS - {"reference"}:
            raise ValueError(f"unknown fields {sorted(unknown)}: use {{question}}, {{reference}}, {{answer_a}}, {{answer_b}}")
        return prompt

    @model_validator(mode="after")
    def _model_with_url(self) -> JudgeConfig:
        if self.url and not self.model:
            raise ValueError("evaluate.judge.url is set: name the judge model in evaluate.judge.model")
        return self


class EvaluateConfig(Section):
    max_batches: int = Field(50, ge=1)
    # sft: held-out prompts answered by the model (greedy) and scored beside the baseline responder.
    generate_prompts: int = Field(64, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    # The team's own evaluation set (sft): a path or a list of them, in any format finetune.data
    # takes; written as the eval_set split, and dropped from the training split where it overlaps.
    data: str | list[str] | None = Field(None, min_length=1)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


# Registered model names and aliases: letters, digits and . _ - (they go into registry queries and URIs).
REGISTRY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class DeployConfig(Section):
    model_name: str = Field("lmforge-demo", pattern=REGISTRY_NAME)
    alias: str = Field("champion", pattern=REGISTRY_NAME)
    # The metric that decides promotion (one of the evaluate stage's eval/ metrics), and which way is
    # better: the new version takes the alias only if it beats the current holder.
    promote_metric: str = "eval/accuracy"
    promote_mode: Literal["max", "min"] = "max"
    # How much better (in the metric's units) on the same evaluation set a new version must be to
    # take the alias; 0: any improvement. Noise between two runs should not move the alias.
    promote_margin: float = Field(0.0, ge=0.0)

    @field_validator("alias")
    @classmethod
    def _not_challenger(cls, v: str) -> str:
        if v == "challenger":
            raise ValueError("'challenger' is the alias every new version takes; choose another (e.g. champion)")
        return v


class RetrainConfig(Section):
    """When the new-data trigger (``lmforge schedule``) starts a retrain: the configured sources hold
    at least this many new or changed files AND this many MB of them, compared by content digest
    with what the last finished pipeline run ingested."""

    min_new_files: int = Field(1, ge=1)
    min_new_mb: float = Field(0.0, ge=0)
    check_every_s: int = Field(300, ge=5)  # how often the check runs (a small Prefect flow run each time)


class Config(Section):
    name: str = "lmforge"
    workdir: str = "runs"
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="small"))
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)  # a second fine-tuning step (off by default)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _something_to_start_from(self) -> Config:
        if self.pretrain.enabled is False and self.model.init_from is None:
            raise ValueError(
                "pretrain.enabled=false leaves nothing to fine-tune: set model.init_from to the model to start "
                "from, or leave pretrain.enabled unset"
            )
        return self

    @model_validator(mode="after")
    def _mixes_and_evaluation_sets_are_instruction_data(self) -> Config:
        # Checked when the config is read, not when a data stage meets them: a run fails in seconds.
        for block in ("finetune", "align"):
            step = getattr(self, block)
            if step.task not in (None, "sft") and not isinstance(step.data, str):
                raise ValueError(
                    f"{block}.data is a list of sources (a mix), which {block}.task={step.task} does not take: "
                    "give one file, folder or glob"
                )
        if self.evaluate.data is not None and "sft" not in (self.finetune.task, self.align.task):
            raise ValueError("evaluate.data (an evaluation set of conversations) is read by finetune.task=sft only: unset it")
        return self

    def aligned(self) -> Config:
        """The config the align step runs under: its block in the place of ``finetune``, which every
        method reads. The team's evaluation set (``evaluate.data``, instruction tuning's) goes with it
        only to a second instruction-tuning step."""
        step = FinetuneConfig.model_validate(self.align.model_dump())
        evaluate = self.evaluate if self.align.task == "sft" else self.evaluate.model_copy(update={"data": None})
        return self.model_copy(update={"finetune": step, "align": AlignConfig(), "evaluate": evaluate})

    def tracking_uri(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def value(self, key: str) -> Any:
        """The JSON value of a dotted key (``data.clean.min_chars``), or of a whole section."""
        node: Any = self.model_dump(mode="json")
        for part in key.split("."):
            node = node[part]
        return node


def display_uri(uri: str) -> str:
    """``uri`` with any password replaced by ***, for logs, terminals and error messages."""
    return re.sub(r"(://[^/@:]+):[^/@]*@", r"\1:***@", uri)


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
        if not e["loc"]:  # a check across sections: its message names its keys
            lines.append(f"{str(e['msg']).removeprefix('Value error, ')}; in {source}")
            continue
        key = ".".join(str(p) for p in e["loc"])
        moved = method_key(key) if e["type"] == "extra_forbidden" else None
        if moved:  # a setting of a method, given where all of them were until each had its own block
            lines.append(f"{key} in {source} moved: use {moved}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' in {source}: remove it or check its spelling")
        else:
            got = e.get("input")
            if isinstance(got, str):  # never echo a password back
                got = display_uri(got)
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
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8): give a YAML config") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(tree).__name__}")
    return apply_overrides(tree, overrides, f"{path}")


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...], source: str) -> Config:
    """A config tree (a YAML file's, or a deployment's parameter) with ``section.key=value``
    overrides applied, validated; errors name ``source``."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        keys, value = parse_override(item)
        _set(tree, keys, value)
    source = source + (" (with command-line overrides)" if overrides else "")
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
