"""Training throughput: lmforge's LightningModule under the Trainer vs a plain PyTorch loop on the same
model and data, vs Hugging Face's LlamaForCausalLM of the same shape in a plain loop.

    python benchmarks/train.py                      # CPU: the "small" preset, a few dozen steps
    python benchmarks/train.py --accelerator cuda --preset gpt2-124m --seq-len 1024 --batch-size 16 \
        --precision bf16-mixed --compile --steps 300 --warmup 50   # see benchmarks/gpu.sh

Each contender trains ``--steps`` optimizer steps on the same synthetic token data (Zipf-distributed
ids, random windows through lm.training.pretrain_data's reader), with AdamW, warmup+cosine and gradient
clipping; tokens/s is timed from step ``--warmup`` to the end (compilation and allocator warm-up
excluded). Ends with one line of key=value figures.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm.config import Config, ModelConfig, PretrainConfig, TrainerConfig  # noqa: E402
from lm.models.folder import build_model  # noqa: E402
from lm.models.transformer import count_params, flops_per_token, llama_config_dict, model_args  # noqa: E402
from lm.text.shards import TokenIndex  # noqa: E402
from lm.training.modules import device_peak_flops, param_groups, warmup_cosine  # noqa: E402
from lm.training.pretrain_data import TokenDataModule  # noqa: E402


def make_tokens(root: Path, vocab_size: int, n_tokens: int, seed: int = 0) -> Path:
    """A token data dir (the data stage's format) of Zipf-distributed ids: realistic unigram skew."""
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(1.2, size=n_tokens) - 1) % vocab_size
    dtype = "uint16" if vocab_size <= 65535 else "uint32"
    n_val = max(n_tokens // 50, 4096)
    ids[n_val:].astype(dtype).tofile(root / "train_00000.bin")
    ids[:n_val].astype(dtype).tofile(root / "val_00000.bin")
    TokenIndex(
        dtype=dtype,
        vocab_size=vocab_size,
        eot_id=0,
        pad_id=1,
        mask_id=2,
        splits={
            "train": {"files": ["train_00000.bin"], "tokens": int(n_tokens - n_val), "documents": 1},
            "val": {"files": ["val_00000.bin"], "tokens": int(n_val), "documents": 1},
        },
        tokenizer="tokenizer.json",  # absent: no sample generations in a benchmark
    ).save(root)
    return root


class _Timer:
    """Step times from step ``warmup`` to the last one.

    GPU: total tokens / total wall time (the device is ours alone). CPU: one torch thread, timed
    with the thread's own CPU clock, mean step: machines that run CI share their cores, and a
    neighbour's burst would otherwise decide the ratio. The CPU figure is tokens per core-second.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.clock = time.perf_counter if device.type == "cuda" else time.thread_time
        self.marks: list[float] = []

    def mark(self, step: int) -> None:
        if self.warmup <= step <= self.steps and len(self.marks) < self.steps - self.warmup + 1:
            if self.device.type == "cuda" and step in (self.warmup, self.steps):
                torch.cuda.synchronize(self.device)
            self.marks.append(self.clock())

    def tokens_per_s(self, tokens_per_step: int) -> float:
        # Over all timed steps (the mean step, not the median): what lmforge does every few steps
        # (logging, the progress bar, divergence checks) is part of what a user waits for.
        return tokens_per_step * (len(self.marks) - 1) / (self.marks[-1] - self.marks[0])


def bench_lmforge(a, data_dir: Path, out_dir: Path) -> float:
    import lightning.pytorch as pl

    from lm.training.child import run_pretrain

    timer = _Timer(a.warmup, a.steps, torch.device(a.device))

    class TimerCallback(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != getattr(self, "last", None):  # once per optimizer step
                self.last = trainer.global_step
                timer.mark(trainer.global_step)

    cfg = Config(
        model=ModelConfig(preset=a.preset, seq_len=a.seq_len),
        pretrain=PretrainConfig(
            max_steps=a.steps,
            batch_size=a.batch_size,
            lr=a.lr,
            warmup_steps=a.lr_warmup,
            seed=0,
            val_every=10**9,
            val_batches=1,
            ckpt_every=10**9,
            keep_last=1,
            resume="never",
            compile=a.compile,
        ),
        trainer=TrainerConfig(
            accelerator=a.accelerator, devices=1, precision=a.precision, log_every=a.log_every
        ),
    )
    run_pretrain(cfg, data_dir, out_dir, extra_callbacks=[TimerCallback()])
    return timer.tokens_per_s(a.tokens_per_step)


def _loader(a, data_dir: Path):
    dm = TokenDataModule(data_dir, a.seq_len, a.batch_size, seed=0, train_samples=a.steps * a.batch_size)
    dm.setup()
    return dm.train_dataloader()


def _plain_loop(a, model: torch.nn.Module, data_dir: Path, forward) -> float:
    """The loop a careful PyTorch user writes: AdamW (fused on GPU), autocast, clip, LambdaLR."""
    device = torch.device(a.device)
    model.to(device).train()
    if a.compile:
        model.compile()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=a.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, a.lr_warmup, a.steps, 0.1))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(a.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    timer = _Timer(a.warmup, a.steps, device)
    for step, (x, y) in enumerate(_loader(a, data_dir), start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward(model, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        timer.mark(step)
        if step == a.steps:
            break
    return timer.tokens_per_s(a.tokens_per_step)


def bench_plain(a, args, data_dir: Path) -> float:
    torch.manual_seed(0)
    return _plain_loop(a, build_model(args), data_dir, lambda m, x, y: m(x, y)[1])


def bench_transformers(a, args, data_dir: Path) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**llama_config_dict(args), use_cache=False, attn_implementation="sdpa"))

    def forward(m, x, y):
        # The same loss as ours: the caller shifted the targets already.
        logits = m(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    return _plain_loop(a, hf, data_dir, forward)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=10)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--tokens", type=int, default=2_000_000, help="synthetic corpus size")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each contender keeps its best")
    p.add_argument("--only", default="lmforge,plain,transformers", help="comma-separated contenders")
    a = p.parse_args()
    a.device = "cuda" if a.accelerator == "cuda" else "cpu"
    if a.device == "cuda":
        torch.set_float32_matmul_precision(
            "high"
        )  # as lm.training.child does: the same TF32 matmuls for every contender
    else:
        torch.set_num_threads(1)  # see _Timer: all work on the one thread whose CPU clock is read
    a.tokens_per_step = a.batch_size * a.seq_len
    args = model_args(ModelConfig(preset=a.preset, seq_len=a.seq_len), a.vocab_size)
    only = set(a.only.split(","))
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_tokens(Path(tmp), a.vocab_size, a.tokens)
        # Contenders alternate, round after round, and each keeps its best round: a neighbour's
        # burst of CPU use then slows one round of one contender, not the comparison.
        for r in range(a.rounds):
            this_round: dict[str, float] = {}
            if "lmforge" in only:
                this_round["lmforge"] = bench_lmforge(a, data_dir, Path(tmp) / f"out{r}")
                gc.collect()
            if "plain" in only:
                this_round["plain"] = bench_plain(a, args, data_dir)
                gc.collect()
            if "transformers" in only:
                try:
                    this_round["transformers"] = bench_transformers(a, args, data_dir)
                except ImportError:
                    print("transformers is not installed: pip install 'lmforge[bench]'", file=sys.stderr)
                    only.discard("transformers")
            for k, v in this_round.items():
                results[k] = max(results.get(k, 0.0), v)
            print(
                f"round {r + 1}/{a.rounds} tokens/s: "
                + " ".join(f"{k}={v:.0f}" for k, v in this_round.items()),
                flush=True,
            )
    with torch.device("meta"):  # shapes only
        n_params = count_params(build_model(args))
    peak = device_peak_flops(torch.device("cuda")) if a.device == "cuda" else None
    fig = {
        "preset": a.preset,
        "params_M": f"{n_params / 1e6:.2f}",
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu-1thread-cputime",
        "precision": a.precision,
        "compile": a.compile,
        "seq_len": a.seq_len,
        "batch": a.batch_size,
        "timed_steps": a.steps - a.warmup,
        "rounds": a.rounds,
    }
    for name, tps in results.items():
        fig[f"{name}_tok_s"] = f"{tps:.0f}"
        if peak:
            fig[f"{name}_mfu"] = f"{tps * flops_per_token(args) / peak:.3f}"
    if "lmforge" in results and "plain" in results:
        fig["ratio_vs_plain"] = f"{results['lmforge'] / results['plain']:.3f}"
    if "lmforge" in results and "transformers" in results:
        fig["ratio_vs_transformers"] = f"{results['lmforge'] / results['transformers']:.3f}"
    print(" ".join(f"{k}={v}" for k, v in fig.items()))
    if not math.isfinite(sum(results.values()) if results else 0.0):
        sys.exit(1)


if __name__ == "__main__":
    main()
