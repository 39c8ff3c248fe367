"""Decoder families: a tiny random model of each, built and saved by ``transformers`` in the test,
runs on our decoder with transformers' logits, generates transformers' greedy tokens through our KV
cache (rows of different lengths in one batch), and exports as its own architecture."""

from __future__ import annotations

import pytest
import torch

from lm.generation.sampling import SamplingParams, generate
from lm.models.folder import load_model
from lm.models.hf import export_hf, hf_config_and_state, import_hf, load_hf
from lm.models.transformer import Decoder
from lm.text.tokenizer import byte_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]  # ids 256..259
IDS = dict(bos_token_id=None, eos_token_id=256, pad_token_id=257)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, **IDS)
SEQ = 24  # longer than every sliding window below, so the window matters


def _llama3_rope(theta: float = 5e5) -> dict:
    return {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


# test id -> (our family, config class, model class, config keywords beyond SMALL)
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", {}),
    "llama3.1-rope": ("llama", "LlamaConfig", "LlamaForCausalLM", {"rope_parameters": _llama3_rope()}),
    "llama-linear-rope": ("llama", "LlamaConfig", "LlamaForCausalLM",
                          {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}),
    "llama-dynamic-rope": ("llama", "LlamaConfig", "LlamaForCausalLM",
                           {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}),
    "llama-yarn-rope": ("llama", "LlamaConfig", "LlamaForCausalLM",
                        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                             "original_max_position_embeddings": 16}}),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "smollm3": ("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]}),
    "gemma": ("gemma", "GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
                "final_logit_softcapping": 3.0}),
    "gemma3": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 24,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}}),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", {}),
    "phi3.5-longrope": ("phi3", "Phi3Config", "Phi3ForCausalLM",
                        {"original_max_position_embeddings": 16,
                         "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                             "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 6.0],
                                             "original_max_position_embeddings": 16}}),
    "gpt2": ("gpt2", "GPT2Config", "GPT2LMHeadModel", None),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from any init (norm gains != 1, biases != 0), so a misplaced tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 and "norm" in name or "ln_" in name and name.endswith("weight")
                    else 0.1 * noise)
    return model.eval()


def hf_model(family: str):
    _, config_cls, model_cls, extra = FAMILIES[family]
    if extra is None:  # GPT-2 names its sizes its own way
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **IDS)
    else:
        config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    config._attn_implementation = "eager"  # the reference: no fused kernel between us and the definition
    torch.manual_seed(0)
    return randomise(getattr(transformers, model_cls)(config))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family id, transformers model, its save_pretrained folder with a tokenizer)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(folder)
    byte_tokenizer(SPECIALS).save(str(folder / "tokenizer.json"))
    return request.param, hf, folder


def test_imported_logits_equal_transformers(family):
    name, hf, folder = family
    ours = load_hf(folder)
    assert isinstance(ours, Decoder) and ours.args.family == FAMILIES[name][0]
    idx = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_greedy_generation_through_our_cache_equals_transformers(family):
    name, hf, folder = family
    # LongRoPE: Hugging Face picks the short or the long factors by the length of each forward; our
    # tables are built once, by the context the model is configured for (short within the original).
    ours = load_hf(folder, max_seq_len=16 if "longrope" in name else None)
    prompts = [[5, 17, 99, 3, 42, 7], [200, 1, 64]]  # different lengths: one batch, rows at their own positions
    got = generate(ours, prompts, SamplingParams(max_new_tokens=10, temperature=0))
    for prompt, generation in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=257)
        assert generation.ids == want[0, len(prompt):].tolist()
    ours._lean_decode = False  # the modules' decode path gives the same tokens
    assert [g.ids for g in generate(ours, prompts, SamplingParams(max_new_tokens=10, temperature=0))] == [g.ids for g in got]


def test_export_loads_in_transformers_as_the_same_class(family, tmp_path):
    name, hf, folder = family
    import_hf(folder, tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    with torch.no_grad():  # a change after import (as fine-tuning makes) must reach the export
        ours.layers[0].mlp.down_proj.weight.mul_(1.5)
    export_hf(ours, folder / "tokenizer.json", tmp_path / "out",
              special_tokens={"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    idx = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
    config, state = hf_config_and_state(ours)
    tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
    assert set(state) == set(hf.state_dict()) - tied


def test_an_unlisted_family_is_refused_with_the_list(tmp_path):
    from lm.errors import ConfigError

    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    transformers.FalconForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="FalconForCausalLM.*supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_hf(tmp_path)


def test_lora_exports_merged_and_as_a_peft_adapter_on_the_base(family, tmp_path):
    from peft import PeftModel

    from lm.config import LoraConfig
    from lm.finetune.lora import adapter_tensors, apply_lora, merge_lora
    from lm.models.family_table import family_named
    from lm.models.hf import export_adapter

    name, hf, folder = family
    net = load_hf(folder)
    targets = family_named(net.args.family).lora_targets  # every linear layer of the family's blocks
    net = apply_lora(net, LoraConfig(enabled=True, r=2, alpha=3.0, dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():  # B starts at zero: give every adapter an update to carry
        for p in (p for n, p in net.named_parameters() if "lora_" in n):
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    merged = merge_lora(net).eval()
    export_hf(merged, folder / "tokenizer.json", tmp_path / "hf")
    files = export_adapter(merged, adapter_tensors(net), 2, 3.0, tmp_path / "adapter", base=str(folder))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]

    idx = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want, before = merged(idx)[0], base(idx).logits
        assert (before - want).abs().max() > 1e-2  # the adapters change the function
        torch.testing.assert_close(tuned(idx).logits, want, atol=1e-4, rtol=0)
        with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # wraps base in place
        torch.testing.assert_close(with_adapter(idx).logits, want, atol=1e-4, rtol=0)


def test_a_classifier_head_on_each_family_learns(family):
    """Classification is a head on any decoder (the last real token's state): it trains on each family."""
    from lm.models.transformer import SequenceClassifier

    name, hf, folder = family
    torch.manual_seed(0)
    net = SequenceClassifier(load_hf(folder), num_classes=2).train()
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 256, (8, 12), generator=g)
    mask = torch.ones_like(idx)
    mask[4:, 8:] = 0  # right padding in half the rows
    labels = (idx[:, 0] > 127).long()  # decided by the first token: the last one must have read it
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, loss = net(idx, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
