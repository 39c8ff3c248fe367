"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for any method's
network, through ``peft``'s adapter injection, and merged back into plain weights on save.

Our linear layers are plain ``nn.Linear`` modules named as Hugging Face's Llama names them
(``q_proj`` ... ``down_proj``), so ``peft.inject_adapter_in_model`` wraps the targeted ones in
place: each computes ``W x + (alpha / r) B A x`` with ``W`` frozen and only ``A`` (r x in) and
``B`` (out x r, zero at the start) trained. Everything else, embeddings included, is frozen. The
network keeps its class and methods; checkpoints hold the wrapped names (``...q_proj.base_layer.weight``,
``...q_proj.lora_A.default.weight``), so a resumed run rebuilds the same wrapping before loading.
:func:`merge_lora` folds ``(alpha / r) B A`` into ``W`` and unwraps, so what is saved and
exported is the plain network, loadable without peft.
"""

from __future__ import annotations

import copy

from torch import nn

from lm.config import LoraConfig
from lm.errors import ConfigError

ADAPTER = "default"


def apply_lora(net: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap ``lora.target_modules`` of ``net`` (in place) with trainable adapters; freeze the rest."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    try:
        net = inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"finetune.lora.target_modules={list(lora.target_modules)}: {e}. The model's linear layers are "
            f"named {', '.join(linear)}"
        ) from None
    return net  # peft froze every parameter but the adapters


def merge_lora(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every adapter folded into the weight it wraps and the wrappers
    replaced by the plain layers: the same function, without peft."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(net)
    wrapped = [(name, m) for name, m in merged.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def trainable_params(net: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in net.parameters() if p.requires_grad}.values())
