"""Chat templates: how a conversation becomes the text (and the tokens) a chat model reads.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
The template is a Jinja string stored with the tokenizer in ``tokenizer_config.json`` (the file
Hugging Face ``transformers``, vLLM and TGI read), so that training, evaluation, our own serving
and any other tool render a conversation the same way. Which template a tokenizer gets:

1. the one its own ``tokenizer_config.json`` (or ``chat_template.jinja``) brings, for a tokenizer
   taken from elsewhere (``tokenizer.kind=file``, a Hugging Face base model);
2. ChatML (:data:`CHATML`) when ``<|im_start|>`` and ``<|im_end|>`` are among its tokens (they
   are in the default ``tokenizer.special_tokens``, so each is one special token):

       <|im_start|>user\\nWhat does ...?<|im_end|>\\n<|im_start|>assistant\\nIt ...<|im_end|>\\n

3. else :data:`PLAIN_TEXT`, which needs no special token but the end-of-text one: each turn is
   ``### role\\ncontent`` and an assistant turn ends with the end-of-text token.

Training learns the assistant's words only: :func:`encode_chat` says, per token, whether it is
part of an assistant turn (its content and the token that closes it). It renders the
conversation prefix by prefix, so the text of each assistant turn is exactly what the template
adds for it, and encodes the pieces between those points separately, so that the tokens of a
prompt are the same in training and when the model answers it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm.errors import DataError

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The tokens that close a turn in the chat templates of the families lmforge imports: ChatML (Qwen,
# SmolLM), Llama 3 (<|eot_id|>, and <|eom_id|> after a tool call), Gemma, Phi-3. Wherever a template
# writes one and the tokenizer has it, the loss mask learns it and generation stops at it.
END_OF_TURN = (IM_END, "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
TOKENIZER_CONFIG = "tokenizer_config.json"

# Qwen's and OpenAI's ChatML, in the Jinja form Hugging Face tokenizers carry.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# For a tokenizer without the ChatML tokens: plain-text headers; the end-of-text token closes an
# assistant turn (and is where generation stops).
PLAIN_TEXT = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + '\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}"
)

Message = dict[str, str]


def _raise(message: str) -> None:
    raise DataError(f"the chat template refused the conversation: {message}")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # As transformers compiles chat templates: blocks trimmed, in a sandbox (a template comes with
    # a tokenizer from elsewhere and must not reach Python objects).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise DataError(f"the chat template is not valid Jinja: {e}") from None


def render_chat(
    template: str, messages: Sequence[Message], add_generation_prompt: bool = False, **variables: Any
) -> str:
    """The text of ``messages`` under ``template``; ``add_generation_prompt`` appends what opens the
    assistant's reply. ``variables``: what else the template reads (``eos_token`` ...)."""
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
        )
    except TemplateError as e:
        raise DataError(f"the chat template failed to render a conversation: {e}") from None


class ChatFormat:
    """A tokenizer with its chat template and the special tokens the template uses."""

    def __init__(self, tokenizer, config: dict[str, Any]):
        self.tokenizer = tokenizer
        self.config = config
        self.template: str = config["chat_template"]
        self.variables = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        # Generation stops at the token that closes a turn, or at the end of text.
        self.turn_ends = turn_ends(self.template, tokenizer)
        stops = [config.get("eos_token"), *self.turn_ends]
        self.stop_ids = tuple(
            dict.fromkeys(i for t in stops if t for i in [tokenizer.token_to_id(t)] if i is not None)
        )

    @classmethod
    def load(cls, folder: str | Path, tokenizer=None) -> ChatFormat:
        """From a folder holding tokenizer.json and tokenizer_config.json."""
        from lm.text.tokenizer import load_tokenizer

        folder = Path(folder)
        path = folder / TOKENIZER_CONFIG
        if not path.is_file():
            raise DataError(f"{path} does not exist: the chat template is stored there (tokenize stage)")
        config = json.loads(path.read_text(encoding="utf-8"))
        if not config.get("chat_template"):
            raise DataError(f"{path} has no chat_template")
        return cls(tokenizer if tokenizer is not None else load_tokenizer(folder), config)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return render_chat(self.template, messages, add_generation_prompt, **self.variables)

    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, learn: str = "assistant"
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether it is learned (``learn``: see
        :meth:`encode_many`)."""
        return self.encode_many([messages], add_generation_prompt, learn)[0]

    def encode_many(
        self, conversations: Sequence[Sequence[Message]], add_generation_prompt: bool = False, learn: str = "assistant"
    ) -> list[tuple[list[int], list[bool]]]:
        """:meth:`encode` of many conversations, their pieces encoded in one batch. ``learn``
        (``finetune.sft.train_on``): which tokens are marked, the assistant turns', the last
        assistant turn's, or all; the tokens themselves are the same whichever it is."""
        pieces: list[tuple[int, str, bool]] = []  # (conversation, text, learned)
        for n, messages in enumerate(conversations):
            pieces += [(n, text, labelled) for text, labelled in _learned(self._pieces(messages, add_generation_prompt), learn)]
        encodings = self.tokenizer.encode_batch([text for _, text, _ in pieces], add_special_tokens=False)
        out: list[tuple[list[int], list[bool]]] = [([], []) for _ in conversations]
        for (n, _, labelled), enc in zip(pieces, encodings, strict=True):
            out[n][0].extend(enc.ids)
            out[n][1].extend([labelled] * len(enc.ids))
        return out

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered text cut into (piece, is assistant) at the points where each assistant turn
        starts and ends; a turn's trailing whitespace (the newline after ``<|im_end|>``) is not
        learned."""
        full = self.render(messages, add_generation_prompt)
        pieces, pos = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
                raise DataError(
                    "the chat template does not render a conversation as its prefixes followed by each new "
                    "turn, so the assistant's tokens cannot be told apart: use a template that does (ChatML)"
                )
            end = len(upto.rstrip())
            # The turn ends at its end-of-turn token: what a template writes after it (Phi-3 closes a
            # conversation with eos_token) is not the assistant's to say. The last occurrence: the
            # content itself may hold the token's text.
            closing = next((k for t in self.turn_ends if (k := full.rfind(t, len(before), end)) >= 0), None)
            if closing is not None:
                end = closing + len(next(t for t in self.turn_ends if full.startswith(t, closing)))
            if end > len(before):
                pieces += [(full[pos : len(before)], False), (full[len(before) : end], True)]
                pos = end
        pieces.append((full[pos:], False))
        return [(text, labelled) for text, labelled in pieces if text]


def _learned(pieces: list[tuple[str, bool]], learn: str) -> list[tuple[str, bool]]:
    """The assistant pieces (:meth:`ChatFormat._pieces`) relabelled for ``learn``."""
    if learn == "all":
        return [(text, True) for text, _ in pieces]
    if learn == "last_assistant":
        last = max((i for i, (_, labelled) in enumerate(pieces) if labelled), default=-1)
        return [(text, i == last) for i, (text, _) in enumerate(pieces)]
    if learn != "assistant":
        raise ValueError(f"learn={learn!r}: choose assistant, last_assistant or all")
    return pieces


def turn_ends(template: str, tokenizer) -> list[str]:
    """The end-of-turn tokens (:data:`END_OF_TURN`) ``template`` writes that ``tokenizer`` has."""
    return [t for t in END_OF_TURN if t in template and tokenizer.token_to_id(t) is not None]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...} in older files
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_config(
    tokenizer, special_tokens: Sequence[str], own_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ``tokenizer_config.json`` holds for a tokenizer whose first special token ends a text and
    whose second pads: Hugging Face's keys, the chat template chosen as the module docstring says.
    ``own_config``: the tokenizer_config.json a tokenizer from elsewhere came with."""
    template = chat_template_of(own_config) or (
        CHATML if all(tokenizer.token_to_id(t) is not None for t in (IM_START, IM_END)) else PLAIN_TEXT
    )
    eos = special_tokens[0]
    # A template from elsewhere may open with bos_token (Llama 3, Gemma): keep the tokenizer's own.
    bos = _token_text((own_config or {}).get("bos_token"))
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos if bos is not None and tokenizer.token_to_id(bos) is not None else None,
        "eos_token": eos,
        "pad_token": special_tokens[1] if len(special_tokens) > 1 else eos,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }


def chat_template_of(config: dict[str, Any] | None) -> str | None:
    """The default chat template of a Hugging Face tokenizer_config.json (a string, or a list of
    named templates)."""
    template = (config or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def read_own_config(folder: str | Path) -> dict[str, Any] | None:
    """The tokenizer_config.json that came with a tokenizer from elsewhere, its chat template
    filled in from ``chat_template.jinja`` where newer transformers versions keep it; None if none."""
    folder = Path(folder)
    path = folder / TOKENIZER_CONFIG
    config: dict[str, Any] | None = None
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON: {e}") from None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and not chat_template_of(config):
        config = {**(config or {}), "chat_template": jinja.read_text(encoding="utf-8")}
    return config


def write_tokenizer_config(out_dir: Path, tokenizer, special_tokens: Sequence[str], own_dir: Path | None = None) -> str:
    """Write ``tokenizer_config.json`` next to tokenizer.json (see :func:`tokenizer_config`);
    ``own_dir``: the folder a tokenizer from elsewhere came from. Returns the file name."""
    from lm.fileio import atomic_write

    own = read_own_config(own_dir) if own_dir is not None else None
    config = tokenizer_config(tokenizer, special_tokens, own)
    atomic_write(Path(out_dir) / TOKENIZER_CONFIG, json.dumps(config, indent=2, ensure_ascii=False))
    return TOKENIZER_CONFIG
