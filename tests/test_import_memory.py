"""Importing a Hugging Face model costs about its weights in memory, not several copies: the
tensors are memory-mapped from the safetensors shards, kept in their stored dtype (bf16 stays bf16),
assigned to the network rather than copied into a randomly initialised one, and written out as read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_fixtures import ROOT, child_env

from lm.text.tokenizer import byte_tokenizer

transformers = pytest.importorskip("transformers")

# Run in a fresh interpreter: the peak RSS it reports is this import's, not the test session's.
MEASURE = """
import json, sys
import torch
from lm.models.hf import import_hf

def status_mib(key):  # VmRSS: resident now; VmHWM: the peak of this process image (ru_maxrss would
    # also count the forking parent's, which Linux carries across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

# Warm up on a tiny model of the same family: torch loads its meta-tensor kernels and our modules
# the first time (~100 MiB, whatever the model's size); what is measured is what grows with it.
import_hf(sys.argv[3], sys.argv[4])
before = status_mib("VmRSS")
info = import_hf(sys.argv[1], sys.argv[2])
peak = status_mib("VmHWM")
print(json.dumps({"before": before, "peak": peak, "params": info["params"]}))
"""


@pytest.mark.slow
def test_importing_a_sharded_bf16_model_peaks_below_1_3x_its_weight_files(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False, dtype="bfloat16",
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="40MB")  # several shards and an index
    del model
    byte_tokenizer(["<|endoftext|>"]).save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    size_mib = sum(p.stat().st_size for p in shards) / 2**20
    assert len(shards) >= 3 and size_mib >= 100

    tiny = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(tiny).save_pretrained(tmp_path / "tiny")
    byte_tokenizer(["<|endoftext|>"]).save(str(tmp_path / "tiny" / "tokenizer.json"))
    (tmp_path / "tiny" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    args = [str(tmp_path / "hf"), str(tmp_path / "ours"), str(tmp_path / "tiny"), str(tmp_path / "tiny-ours")]
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    print(f"weights {size_mib:.0f} MiB, peak RSS grew {grew:.0f} MiB ({grew / size_mib:.2f}x)")
    assert grew <= 1.3 * size_mib, (grew, size_mib)

    # What was written is the same bf16 tensors, under our names.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16"} and m["params"] > 50_000_000
