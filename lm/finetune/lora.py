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
import json
from pathlib import Path

import torch
from torch import nn

from lm.config import LoraConfig
from lm.errors import ConfigError
from lm.fileio import atomic_write

ADAPTER = "default"
ADAPTER_WEIGHTS = "adapter.safetensors"  # our module names: "<module>.lora_A.weight" (r, in), ".lora_B.weight" (out, r)
ADAPTER_JSON = "adapter.json"  # {"r", "alpha", "target_modules"}


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


def check_quantize(lora: LoraConfig, accelerator: str) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes: say so in one line, before anything is loaded."""
    if lora.quantize == "none":
        return
    import torch

    if accelerator == "cpu" or not torch.cuda.is_available():
        raise ConfigError(
            "finetune.lora.quantize=4bit (QLoRA) needs a CUDA GPU, and this run has none: "
            "use finetune.lora.quantize=none (plain LoRA) on a CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "finetune.lora.quantize=4bit needs bitsandbytes: pip install 'lmforge[gpu]'"
        ) from None


def quantize_4bit(net: nn.Module) -> nn.Module:
    """QLoRA's base (Dettmers et al. 2023): every linear layer of the blocks becomes a frozen
    bitsandbytes NF4 layer computing in bf16 (quantized when the network moves to the GPU);
    embeddings, norms and the output layer stay as they are. In place; returns ``net``."""
    import bitsandbytes as bnb

    for name, module in list(net.named_modules()):
        if not (isinstance(module, nn.Linear) and name.startswith("layers.")):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, q)
    return net


def _dequantized(layer: nn.Module, delta: torch.Tensor | None = None) -> nn.Linear:
    """A bitsandbytes 4-bit layer as a plain float32 ``nn.Linear`` (plus ``delta`` on its weight)."""
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight if delta is None else weight + delta.float())
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.float())
    return plain


def _is_4bit(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Linear4bit" and type(layer).__module__.startswith("bitsandbytes")


def merge_lora(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every adapter folded into the weight it wraps and the wrappers
    replaced by the plain layers: the same function, without peft. A 4-bit base (QLoRA) comes
    back in float32: the export is the tuned model at full precision, not re-quantized."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(net)
    wrapped = [(name, m) for name, m in merged.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        base = module.get_base_layer()
        if _is_4bit(base):
            plain = _dequantized(base, module.get_delta_weight(ADAPTER))
        else:
            module.merge(adapter_names=[ADAPTER])
            plain = base
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, plain)
    for name, module in list(merged.named_modules()):  # QLoRA: the layers no adapter wrapped
        if _is_4bit(module):
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, _dequantized(module))
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def trainable_params(net: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in net.parameters() if p.requires_grad}.values())


def adapter_tensors(net: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A (r, in), B (out, r))} of every adapted layer of ``net``."""
    from peft.tuners.lora import LoraLayer

    return {
        name: (m.lora_A[ADAPTER].weight.detach().cpu(), m.lora_B[ADAPTER].weight.detach().cpu())
        for name, m in net.named_modules()
        if isinstance(m, LoraLayer)
    }


def save_adapter(net: nn.Module, out_dir: Path) -> list[str]:
    """Write the adapters of ``net`` themselves (not merged) beside the merged model: what export
    turns into a peft adapter folder in the family's own names."""
    from safetensors.torch import save_file

    tensors = adapter_tensors(net)
    if not tensors:
        return []
    any_layer = next(m for m in net.modules() if hasattr(m, "lora_alpha") and ADAPTER in m.lora_alpha)
    state = {f"{name}.lora_{ab}.weight": t.contiguous() for name, pair in tensors.items() for ab, t in zip("AB", pair, strict=True)}
    atomic_write(Path(out_dir) / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    meta = {"r": any_layer.r[ADAPTER], "alpha": any_layer.lora_alpha[ADAPTER],
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in tensors})}
    atomic_write(Path(out_dir) / ADAPTER_JSON, json.dumps(meta, indent=2))
    return [ADAPTER_WEIGHTS, ADAPTER_JSON]


def load_adapter(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict] | None:
    """What :func:`save_adapter` wrote in ``folder``, or None if it holds no adapter."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return None
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    tensors = {n: (state[f"{n}.lora_A.weight"], state[f"{n}.lora_B.weight"]) for n in sorted(names)}
    return tensors, json.loads((folder / ADAPTER_JSON).read_text())
