"""A decoder folder ready to generate: lmforge's (model.json) or Hugging Face's (config.json), with its
tokenizer, end-of-text ids and chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lm.errors import LmforgeError
from lm.models.folder import MODEL_JSON, load_model
from lm.models.hf import is_hf_folder, load_hf
from lm.text.chat import read_own_config
from lm.text.tokenizer import TOKENIZER, load_tokenizer


@dataclass
class GenerationModel:
    """A decoder ready to generate, with what its folder says about its text."""

    model: nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    eos_ids: list[int]
    chat_template: str | None = None  # Jinja, Hugging Face's tokenizer_config.json convention
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token ... for the template

    def chat_prompt(self, user_message: str) -> str:
        """The text the model reads for one user message, through its chat template."""
        if self.chat_template is None:
            raise LmforgeError("this model has no chat template (tokenizer_config.json 'chat_template')")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": user_message}],
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise LmforgeError(f"the model's chat template failed: {e}") from None


def load_for_generation(path: str | Path, tokenizer_path: str | Path | None = None) -> GenerationModel:
    """A decoder folder with its tokenizer: one written by ``lm.models.folder.save_model`` (a pretraining
    output, an imported base model, an export's ``lm/``; an export folder itself means its ``lm/``),
    with ``tokenizer.json`` in it or its parent unless ``tokenizer_path`` is given; or a Hugging Face
    ``save_pretrained`` LlamaForCausalLM folder (``lm.models.hf``). End-of-text: model.json's ``eot_id``,
    generation_config.json's ``eos_token_id`` and tokenizer_config.json's ``eos_token``; the chat
    template and its special tokens: ``tokenizer_config.json`` beside the tokenizer."""
    folder = Path(path)
    if not folder.is_dir():
        raise LmforgeError(f"model folder {folder} does not exist")
    meta_path = folder / MODEL_JSON
    eos: set[int] = set()
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "decoder" and (folder / "lm" / MODEL_JSON).is_file():
            folder = folder / "lm"  # an export: the fine-tuned network is no language model, its lm/ is
            meta = json.loads((folder / MODEL_JSON).read_text())
        if meta.get("kind") != "decoder":
            raise LmforgeError(f"{path} holds a {meta.get('kind')} model; only a decoder generates text")
        model = load_model(folder)
        if meta.get("eot_id") is not None:
            eos.add(int(meta["eot_id"]))
    elif is_hf_folder(folder):
        model = load_hf(folder)
        if model.args.kind != "decoder":
            raise LmforgeError(
                f"{path} holds a {model.args.arch} {model.args.kind}; only a decoder generates text"
            )
        gen_config = folder / "generation_config.json"
        if gen_config.is_file():
            ids = json.loads(gen_config.read_text()).get("eos_token_id")
            eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])
    else:
        raise LmforgeError(
            f"{path} is not a model folder: no {MODEL_JSON} (lmforge's pretrain, base_model or export) "
            "and no config.json + model.safetensors (Hugging Face)"
        )
    if tokenizer_path is None:
        found = [d / TOKENIZER for d in (folder, folder.parent) if (d / TOKENIZER).is_file()]
        if not found:
            raise LmforgeError(f"no {TOKENIZER} in {folder} or {folder.parent}: pass the tokenizer's path")
        tokenizer_path = found[0]
    tokenizer = load_tokenizer(Path(tokenizer_path))
    template, specials = None, {}
    cfg = read_own_config(Path(tokenizer_path).parent)  # chat_template.jinja read too
    if cfg is not None:
        template = cfg.get("chat_template")
        specials = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
        if "eos_token" in specials and tokenizer.token_to_id(specials["eos_token"]) is not None:
            eos.add(tokenizer.token_to_id(specials["eos_token"]))
    return GenerationModel(model, tokenizer, sorted(eos), template, specials)
