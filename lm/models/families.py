"""The table of model families lmforge imports from and exports to Hugging Face.

A family is data, not a copy of a network: how its ``config.json`` becomes our ``ModelArgs``
(the switches of ``lm.model``'s decoder, or an encoder's), how its weight names map onto ours
and back, which of our linear layers LoRA targets, and which module is the block FSDP wraps.
Decoders live in :mod:`lm.models.decoders`, encoders in :mod:`lm.models.encoders`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lm.errors import ConfigError
from lm.model import ModelArgs

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
    # lm.model.build_model(args) builds.
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


def all_families() -> list[Family]:
    from lm.models.decoders import FAMILIES as DECODERS
    from lm.models.encoders import FAMILIES as ENCODERS

    return [*DECODERS, *ENCODERS]


def block_classes() -> set[type[torch.nn.Module]]:
    """The transformer block of every network a family runs on: the unit FSDP wraps."""
    from lm.bert import BertLayer
    from lm.model import Block
    from lm.models.modernbert import ModernBertLayer

    return {Block, BertLayer, ModernBertLayer}


def family_of(folder: Path, config: dict[str, Any]) -> tuple[Family, str]:
    """The family config.json names and the architecture it was found by; else a ConfigError that
    lists every architecture lmforge reads."""
    families = all_families()
    found = config.get("architectures") or []
    for name in found:
        for fam in families:
            if name in fam.architectures:
                return fam, name
    if not found:
        for fam in families:
            if config.get("model_type") in fam.model_types:
                return fam, fam.architectures[0]
    supported = ", ".join(a for fam in families for a in fam.architectures)
    raise ConfigError(
        f"{folder}: a Hugging Face model with architectures={found} (model_type={config.get('model_type')!r}), "
        f"which lmforge does not load; supported: {supported}"
    )


def family_named(name: str) -> Family:
    for fam in all_families():
        if fam.name == name:
            return fam
    raise KeyError(f"no model family {name!r}")


def need(folder: Path, config: dict[str, Any], key: str) -> Any:
    """config[key], or a ConfigError naming the file and the key."""
    if config.get(key) is None:
        raise ConfigError(f"{folder / 'config.json'} has no {key!r}")
    return config[key]


def capped(seq_len: int, max_seq_len: int | None) -> int:
    return min(seq_len, max_seq_len) if max_seq_len else seq_len
