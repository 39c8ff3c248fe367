"""What a model family is (one row of the table in :mod:`lm.models.family_table`): how its
``config.json`` becomes our ``ModelArgs``, how its weight names map onto ours and back.

A family is data, not a copy of a network: the switches of ``lm.models.transformer``'s decoder, or an
encoder's, and a name map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lm.errors import ConfigError
from lm.models.transformer import ModelArgs

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One Hugging Face family, e.g. ``qwen2`` (``Qwen2ForCausalLM``)."""

    name: str
    # The config.json ``architectures`` it reads; the first is the one export writes for a decoder.
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]  # config.json ``model_type`` values (for a config naming no architecture)
    kind: str  # decoder | encoder
    # (folder, config.json, max_seq_len) -> ModelArgs; a ConfigError naming the key it cannot take.
    read_config: Callable[[Path, dict[str, Any], int | None], ModelArgs]
    # The checkpoint's tensors (names as save_pretrained writes them) -> ours, for the network
    # lm.models.folder.build_model(args) builds.
    from_hf: Callable[[State, ModelArgs], State]
    # Ours -> the checkpoint's names and layout (None: export writes lmforge's own format only).
    to_hf: Callable[[State, ModelArgs], State] | None = None
    # Our linear layers LoRA adapts by default, by their last name.
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Our parameters a checkpoint of this family may lack (filled at random): e.g. an MLM head
    # for an encoder saved without one. Regexes.
    optional: tuple[str, ...] = field(default=())
    # Groups of our linear layers the checkpoint stores as one matrix, rows in this order (Phi-3's
    # qkv_proj and gate_up_proj, GPT-2's c_attn): a LoRA adapter on them exports as one adapter
    # of the summed rank.
    fused: tuple[tuple[str, ...], ...] = ()
    # The checkpoint stores linear weights as (in, out): GPT-2's Conv1D (peft's fan_in_fan_out).
    transposed: bool = False


def need(folder: Path, config: dict[str, Any], key: str) -> Any:
    """config[key], or a ConfigError naming the file and the key."""
    if config.get(key) is None:
        raise ConfigError(f"{folder / 'config.json'} has no {key!r}")
    return config[key]


def capped(seq_len: int, max_seq_len: int | None) -> int:
    return min(seq_len, max_seq_len) if max_seq_len else seq_len
