"""What the methods that tune a decoder on conversations (sft, dpo) share: the checks on the
network and the strategy, the LoRA/QLoRA wrapping, what the recipe saves, and how the data is named
in model.json (file names only: no path of this machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lm.config import Config, DataSource, FinetuneConfig
from lm.errors import ConfigError


def tunable_decoder(cfg: Config, backbone: nn.Module, task: str) -> nn.Module:
    """The network ``task`` trains: the decoder itself, or LoRA adapters on it (on a 4-bit base under
    QLoRA), after the checks that can fail before any data is read."""
    from lm.finetune.lora import apply_lora, check_quantize, quantize_4bit

    f = cfg.finetune
    if not getattr(backbone, "causal", False):
        raise ConfigError(f"finetune.task={task} tunes a decoder; the pretrained model is a {backbone.args.kind}")
    if not f.lora.enabled:
        return backbone
    if cfg.trainer.strategy == "fsdp":
        raise ConfigError("finetune.lora with trainer.strategy=fsdp is not supported yet: use ddp")
    check_quantize(f.lora, cfg.trainer.accelerator)
    return apply_lora(quantize_4bit(backbone) if f.lora.quantize == "4bit" else backbone, f.lora)


def lora_saving(f: FinetuneConfig) -> dict[str, Any]:
    """The Recipe's ``to_save`` / ``also_save``: LoRA merged into the weights, and the adapter itself."""
    from lm.finetune.lora import merge_lora, save_adapter

    return {"to_save": merge_lora, "also_save": save_adapter} if f.lora.enabled else {}


def lora_words(f: FinetuneConfig) -> str:
    """The log line's words for LoRA (empty for full fine-tuning)."""
    return f"LoRA r={f.lora.r} on {','.join(f.lora.target_modules)}, " if f.lora.enabled else ""


def data_name(data: str | list[DataSource]) -> str | list[dict[str, Any]]:
    """``finetune.data`` as model.json keeps it: ``stdlib``, a file name, or each source's name and weight."""
    if isinstance(data, str):
        return data if data == "stdlib" else Path(data).name
    return [{"path": Path(s.path).name, "weight": s.weight} for s in data]
