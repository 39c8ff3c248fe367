"""Each family's own chat template and end-of-turn token: the loss mask learns that token, and after
a short instruction-tuning run generation ends there, not at the token limit (the most common
complaint about fine-tuned chat models: training and serving disagreed on the template or the end).

The templates are the families' released ones in their no-tools form: Llama 3, Gemma (which
refuses a system turn and opens with bos_token), Phi-3 (which closes a conversation with
eos_token), Qwen2.5 (ChatML with its default system prompt), Mistral ([INST], the reply closed
by eos_token), ChatML for Qwen3 and SmolLM3; GPT-2 has none and gets lmforge's plain-text template,
whose end is the end-of-text token. The training is full fine-tuning: every weight of the family's
network learns."""

from __future__ import annotations

import json

import pytest
import torch
from test_families import hf_model

from lm.finetune.sft import batch_logits, encode_examples, end_of_turn, summed_nats
from lm.generation.sampling import SamplingParams, generate
from lm.models.folder import load_model
from lm.models.hf import import_hf
from lm.pipeline.base_model import _special_tokens
from lm.text.chat import ChatFormat, read_own_config, tokenizer_config
from lm.text.tokenizer import byte_tokenizer, load_tokenizer

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == \"user\") or "
    "(message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_KEYS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# test family id (tests/test_families.py) -> (template or None, special tokens, tokenizer_config.json keys,
# the token that must end a reply)
CASES = {
    "llama3.1-rope": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"], {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"),
    "gemma2": (GEMMA, GEMMA_TOKENS, GEMMA_KEYS, "<end_of_turn>"),
    "phi3": (PHI3, ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
             {"eos_token": "<|endoftext|>"}, "<|end|>"),
    "qwen2": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
    "gpt2": (None, ["<|endoftext|>"], {"eos_token": "<|endoftext|>"}, "<|endoftext|>"),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}, "</s>"),
    "qwen3": (CHATML, CHATML_TOKENS, {"eos_token": "<|im_end|>"}, "<|im_end|>"),
    "smollm3": (CHATML, CHATML_TOKENS, {"eos_token": "<|im_end|>"}, "<|im_end|>"),
    "gemma": (GEMMA, GEMMA_TOKENS, GEMMA_KEYS, "<end_of_turn>"),
    "gemma3": (GEMMA, GEMMA_TOKENS, GEMMA_KEYS, "<end_of_turn>"),
}
ASK = [{"role": "user", "content": "Greet Ann."}]
ANSWER = "Hi Ann!"


@pytest.mark.parametrize("family", list(CASES))
def test_after_a_short_sft_run_generation_ends_at_the_family_end_of_turn_token(tmp_path, family):
    template, specials, keys, end = CASES[family]
    # Qwen's default system prompt alone would fill the tiny model's 64 positions (one token a byte).
    ask = [{"role": "system", "content": "Be brief."}, *ASK] if family == "qwen2" else ASK
    hf_model(family).save_pretrained(tmp_path / "hf")
    byte_tokenizer(specials).save(str(tmp_path / "hf" / "tokenizer.json"))
    if template is not None and family == "gemma2":  # transformers 5 keeps the template in its own file
        (tmp_path / "hf" / "chat_template.jinja").write_text(template)
    elif template is not None:
        keys = {**keys, "chat_template": template}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(keys))

    # What the base_model and tokenize stages do with a model from elsewhere.
    import_hf(tmp_path / "hf", tmp_path / "base")
    tok = load_tokenizer(tmp_path / "base")
    config = tokenizer_config(tok, _special_tokens(tmp_path / "base"), read_own_config(tmp_path / "base"))
    fmt = ChatFormat(tok, config)
    end_id = tok.token_to_id(end)
    assert end_of_turn(config, tok) == end and end_id in fmt.stop_ids

    example = encode_examples(fmt, [[*ask, {"role": "assistant", "content": ANSWER}]], seq_len=64).items[0]
    learned = [t for t in example[1].tolist() if t != -100]
    # The reply and its end-of-turn token, nothing after it (Phi-3's template closes a conversation with eos).
    assert tok.decode(learned[:-1], skip_special_tokens=False).strip() == ANSWER and learned[-1] == end_id

    net = load_model(tmp_path / "base").train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    batch = (example[0][None], example[1][None])
    for _ in range(60):
        nats, n = summed_nats(batch_logits(net, batch), batch[1])
        (nats / n).backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    prompt = fmt.encode(ask, add_generation_prompt=True)[0]
    out = generate(net, [prompt], SamplingParams(max_new_tokens=24, temperature=0), eos_ids=fmt.stop_ids, tokenizer=tok)[0]
    assert out.finish_reason == "stop" and out.completion_tokens == len(out.ids) + 1
    assert tok.decode(out.ids).strip() == ANSWER
    with torch.no_grad():  # the token it stopped at is the family's end of turn
        stop = net(torch.tensor([prompt + out.ids]))[0][0, -1].argmax().item()
    assert stop == end_id
