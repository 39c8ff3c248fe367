#!/usr/bin/env bash
# Training throughput on one H100/H200: the gpt2-124m preset in bf16 with torch.compile, a few hundred
# steps on synthetic Zipf-distributed tokens (no data stage needed). Prints tokens/s and MFU (dense
# bf16 peak from lm.training.modules.PEAK_FLOPS) for lmforge's Trainer path, the plain PyTorch loop and HF Llama.
# Then the tests marked gpu (QLoRA on a 4-bit base, bf16 training) and LoRA fine-tuning of an imported
# Qwen2-shaped model against transformers + peft (benchmarks/finetune.py) on the GPU.
# Not run by CI. Usage: benchmarks/gpu.sh [extra benchmarks/train.py flags, e.g. --only lmforge]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-300}
BATCH=${BATCH:-32}   # 32 x 1024 = 32k tokens per step; fits easily in 141 GB

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuda {torch.version.cuda}")
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true

# vocab 50304 = GPT-2's 50257 rounded up to a multiple of 64 (tensor-core-friendly shapes).
"$PY" benchmarks/train.py \
    --accelerator cuda --precision bf16-mixed --compile \
    --preset gpt2-124m --vocab-size 50304 --seq-len 1024 --batch-size "$BATCH" \
    --steps "$STEPS" --warmup 50 --lr 6e-4 --lr-warmup 50 --log-every 50 \
    --tokens 50000000 --rounds 1 "$@"

"$PY" -m pip install -q -e '.[dev,gpu,bench]' 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pytest -q -m gpu tests/
"$PY" benchmarks/finetune.py --device cuda
