"""A model folder as lmforge writes it: ``model.safetensors`` + ``model.json`` (every dimension and
switch of the network, what it is, and what its writer added), and the network built back from it.

Above the networks (``lm.models.transformer``, ``lm.models.bert``, ``lm.models.modernbert``): it
picks which one ``ModelArgs.arch`` names, so none of them needs to know the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lm.fileio import atomic_write
from lm.models.bert import BertEncoder
from lm.models.modernbert import ModernBertEncoder
from lm.models.transformer import Decoder, Encoder, ModelArgs, SequenceClassifier


def build_model(args: ModelArgs) -> nn.Module:
    """The network ``args`` describe: a Llama-style Decoder or Encoder, or a BERT encoder."""
    if args.arch == "bert":
        return BertEncoder(args)
    if args.arch == "modernbert":
        return ModernBertEncoder(args)
    if args.arch != "llama":
        raise ValueError(f"unknown model arch {args.arch!r}: llama, bert or modernbert")
    return {"decoder": Decoder, "encoder": Encoder}[args.kind](args)


# ---- save / load ----------------------------------------------------------------------------
MODEL_WEIGHTS = "model.safetensors"


MODEL_JSON = "model.json"


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (args, kind, classes, ``extra``) atomically.
    ``state``: the weights to write, when the module in memory does not hold them whole (FSDP)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, SequenceClassifier):
        meta = {"kind": "classifier", "backbone_kind": model.args.kind, "num_classes": model.num_classes}
    else:
        meta = {"kind": model.args.kind}
    meta["args"] = asdict(model.args)
    meta.update(extra or {})
    # safetensors refuses shared tensors: drop the tied lm_head, load_model re-ties it.
    state = {k: v.detach().cpu().contiguous() for k, v in (state or model.state_dict()).items()}
    if model.args.tie_embeddings:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    atomic_write(out_dir / MODEL_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write(out_dir / MODEL_JSON, json.dumps(meta, indent=2, sort_keys=True))
    return out_dir / MODEL_WEIGHTS


def read_model_json(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a model folder written by lm.models.folder.save_model")
    return json.loads(path.read_text())


def load_model(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network described by ``model.json`` and load ``model.safetensors``; eval mode."""
    from safetensors.torch import load_file

    meta = read_model_json(model_dir)
    args = ModelArgs.from_dict(meta["args"])
    model: nn.Module = build_model(args)
    if meta["kind"] == "classifier":
        model = SequenceClassifier(model, int(meta["num_classes"]))
    state = load_file(str(Path(model_dir) / MODEL_WEIGHTS), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (args.tie_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: weights do not fit model.json (missing {missing}, unexpected {unexpected})"
        )
    model.meta = meta  # the ids, label names ... that save_model's caller put in extra
    return model.to(map_location).eval()
