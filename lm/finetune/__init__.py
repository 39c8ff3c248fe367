"""Fine-tuning methods, each one module behind one small interface, selected by ``finetune.task``.

A method's data (the ``finetune_data`` stage: its train/val/test splits) is built by a function of
``lm.data`` named in :data:`DATA`, apart from the method's module, so that the data stage's cache
key hashes data code only, not the training, evaluation and serving code a method module holds.
A method module provides everything else that differs between methods, and nothing more:

- ``build(cfg, backbone, data_dir, tokens_dir) -> Recipe``: its network around the pretrained
  backbone, its LightningModule (a subclass of ``lm.training.modules.OptimisedModule``) and its DataModule;
  training itself (optimiser, checkpoints, resume, strategies, saving) is shared (``lm.training.child``);
- ``METRICS``: the ``eval/`` metrics its ``evaluate`` reports, each with the direction that is better;
  ``TOKEN_METRICS``: those of its metrics measured per token, which only compare between models
  that share a tokenizer (the others are measured on text or labels; a method without it has all
  its metrics taken as per token);
- ``evaluate(model_dir, data_dir, tokenizer_path, *, base_dir, out_dir, settings) -> dict``: those
  metrics on its test split, the model reading text with the tokenizer at ``tokenizer_path``
  (``base_dir``: the pretrained model before tuning; ``settings``: the ``evaluate`` config section),
  and sft's also on the team's own evaluation set (``eval_set/...``) when ``data_dir`` holds one;
- ``export(model_dir, data_dir, *, out_dir) -> list[str]``: files the export folder needs beyond
  the weights and the tokenizer;
- ``Predictor(folder)``: how the exported (and registered) model predicts, a DataFrame in and out;
  ``Predictor.input_example()`` is what the registry shows as the model's input.

A method's settings are its own block of the config, ``finetune.<name>`` (a ``lm.config.MethodConfig``
field of ``FinetuneConfig``, whose names are the values ``finetune.task`` may take); the DataModule
batching a method's train/val splits is shared (:mod:`lm.finetune.splits`), and so is the judge
that compares a method's answers with the model's before tuning (:mod:`lm.finetune.judge`).

Adding a method is a new module, one line in :data:`METHODS` (and in :data:`DATA`), and its settings
block in ``lm.config``. Methods are imported only when used, so reading a config does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

# finetune.task -> the module that implements it.
METHODS: dict[str, str] = {
    "classify": "lm.finetune.classify",
    "sft": "lm.finetune.sft",
    "dpo": "lm.finetune.dpo",
}

# finetune.task -> "module:function" building its data: (cfg, *, out_dir) -> StageResult.
DATA: dict[str, str] = {
    "classify": "lm.data.labelled:build_finetune_data",
    "sft": "lm.data.instruct:build_instruct_data",
    "dpo": "lm.data.preference:build_preference_data",
}


def data_builder(task: str) -> Callable[..., Any]:
    """The function that builds method ``task``'s data (a name in :data:`DATA`)."""
    module, _, name = DATA[task].partition(":")
    return getattr(importlib.import_module(module), name)


def method(task: str) -> ModuleType:
    """The module of fine-tuning method ``task`` (a name in :data:`METHODS`)."""
    return importlib.import_module(METHODS[task])


@dataclass
class Recipe:
    """What a method hands the shared training loop."""

    module: Any  # an lm.training.modules.OptimisedModule subclass; module.net is the network that is saved
    datamodule: Any  # a LightningDataModule
    tokens_per_batch: int  # tokens in one micro-batch (throughput, MFU)
    describe: str  # one line for the log: what is trained on what
    meta: dict[str, Any] = field(default_factory=dict)  # what model.json keeps (label names ...)
    train_examples: int | None = None  # a finite training set: validated at least once per epoch
    # The network to save, made from module.net when training is over (LoRA: adapters merged into
    # the weights, lm.finetune.lora.merge_lora); None: module.net itself.
    to_save: Callable[[Any], Any] | None = None
    # What else to write from the trained module.net into the method's folder (LoRA: the adapter
    # itself, lm.finetune.lora.save_adapter).
    also_save: Callable[[Any, Path], Any] | None = None
