"""QLoRA (finetune.lora.quantize=4bit): refused on a CPU in one line; on a CUDA GPU, a 4-bit NF4 base
(bitsandbytes) with LoRA adapters trains, and merges back into a float32 model that computes the same."""

from __future__ import annotations

import pytest
import torch

from lm.config import LoraConfig, load_config
from lm.errors import ConfigError
from lm.models.folder import build_model
from lm.models.transformer import ModelArgs


def test_quantize_without_adapters_is_refused_in_one_line():
    with pytest.raises(ValueError, match="set finetune.lora.enabled=true too"):
        LoraConfig(quantize="4bit")


def test_qlora_on_a_cpu_is_refused_in_one_line(tmp_path):
    from lm.finetune import sft

    cfg = load_config("tiny", ["finetune.task=sft", "finetune.lora.enabled=true", "finetune.lora.quantize=4bit"])
    assert cfg.trainer.accelerator == "cpu"
    with pytest.raises(ConfigError) as e:
        sft.build(cfg, build_model(ModelArgs(300, 1, 2, 2, 16, 32, 16)), tmp_path, tmp_path)
    assert str(e.value).count("\n") == 0 and "finetune.lora.quantize=4bit" in str(e.value) and "CUDA GPU" in str(e.value)


@pytest.mark.gpu
def test_qlora_trains_on_a_4bit_base_and_merges_to_full_precision():
    pytest.importorskip("bitsandbytes")
    from lm.finetune.lora import apply_lora, check_quantize, merge_lora, quantize_4bit

    lora = LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0, quantize="4bit",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    check_quantize(lora, "cuda")
    torch.manual_seed(0)
    net = build_model(ModelArgs(512, 2, 4, 2, 128, 256, 64, attn_bias=True, family="qwen2"))
    net = apply_lora(quantize_4bit(net).cuda(), lora)
    assert type(net.layers[0].mlp.gate_proj).__name__ == "Linear4bit"  # not targeted: quantized, frozen
    x = (torch.arange(4 * 64, device="cuda").view(4, 64) * 7) % 512  # each next token follows from this one
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(80):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = net(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    merged = merge_lora(net).eval()
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    net.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = net(x)[0].float()
    with torch.no_grad():
        got = merged(x)[0]
    assert (got - want).abs().max() < 0.1 * want.abs().max()
