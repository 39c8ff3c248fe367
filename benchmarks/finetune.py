"""Fine-tuning an imported Hugging Face model: LoRA training speed and memory, and greedy decode
speed, of lmforge against transformers + peft on the same weights.

    python benchmarks/finetune.py                       # CPU, every core, a few minutes
    python benchmarks/finetune.py --device cuda --steps 30 --warmup 5 --rounds 3

The model is a Qwen2-shaped decoder of 50.2M parameters (12 layers, d_model 512, 8 heads, 2 kv
heads, vocabulary 32000, tied embeddings, q/k/v biases) with random weights, built by
``transformers`` and written with ``save_pretrained`` to a temporary folder that both sides read.

Fine-tuning (``--batch`` x ``--seq-len`` random tokens a step, every next token learned; LoRA r=8,
alpha=16, dropout 0 on q/k/v/o; AdamW):

- **lmforge**: ``lm.hf.load_hf`` (our Decoder with Qwen2's switches), ``lm.finetune.lora.apply_lora``,
  and the real training path: ``SFTModule`` under ``lm.training.child.fit_and_save`` (Lightning's Trainer,
  with lmforge's checkpoint, throughput and progress callbacks; after the last timed step it
  validates once, checkpoints, saves the merged model and the adapter, as a fine-tuning run does:
  untimed);
- **transformers_peft**: ``Qwen2ForCausalLM.from_pretrained`` (SDPA), ``peft.get_peft_model``, and a
  plain loop: forward with labels, backward, AdamW step, zero_grad.

Each contender runs in a child process of its own (this script with ``--child NAME``), so that its
peak memory is its own: peak RSS (``VmHWM``) minus the RSS just before the model is built, with
every library both sides use imported before that point (CUDA: ``max_memory_allocated`` minus the
memory allocated before). Steps before ``--warmup`` are not timed; the contenders alternate for
``--rounds`` rounds and each keeps its best round (its smallest peak for memory).

Decode: the same model without LoRA, one prompt of 32 random tokens, 128 new tokens, greedy, no
end-of-text id: ``lm.generation.sampling.generate`` against ``model.generate(do_sample=False,
min_new_tokens=128)``, in this process, the same alternation.

Clocks: the wall clock (``*_steps_s``, ``*_tokens_s``) and the process's CPU time over all its
threads (``*_cpu_s``: per core-second). Torch threads are pinned to ``--threads`` in every process.
On a CPU shared with other jobs the goals are read on the CPU-time figures (benchmarks/README.md:
with wall-clock time a neighbour's burst decides the ratio); on CUDA on the wall clock. Ends with
one line of key=value figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONTENDERS = ("lmforge", "transformers_peft")
LR, BETAS, WEIGHT_DECAY = 5e-4, (0.9, 0.95), 0.01  # lmforge's finetune defaults, given to both sides
RESULT = "RESULT "  # a child's last line: RESULT {json}


def qwen2_config(seq_len: int):
    """The 50.2M-parameter Qwen2 shape (8 layers would be 38.9M)."""
    import transformers

    return transformers.Qwen2Config(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max(1024, seq_len),
        tie_word_embeddings=True,
        use_cache=False,
    )


def token_batches(a) -> torch.Tensor:
    """(steps * batch, seq_len) random ids, the same in every process."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 32000, (a.steps * a.batch, a.seq_len), generator=g)


def resident_mib() -> float:
    """This process's RSS now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mib() -> float:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    child would report its parent's peak at fork time when that was higher than its own."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class StepClock:
    """Wall and process CPU time at the end of step ``warmup`` and of every later step; on CUDA
    synchronised. Memory is read at the last step (before anything a run does after training)."""

    def __init__(self, a, device: torch.device, base_mib: float):
        self.warmup, self.steps, self.device, self.base_mib = a.warmup, a.steps, device, base_mib
        self.marks: list[tuple[float, float]] = []
        self.peak_mib = float("nan")
        self.first_loss = float("nan")

    def mark(self, step: int, loss: torch.Tensor) -> None:
        if step == 1:
            self.first_loss = float(loss)
        if step < self.warmup or len(self.marks) > self.steps - self.warmup:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((time.perf_counter(), time.process_time()))
        if step == self.steps:
            if self.device.type == "cuda":
                self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base_mib
            else:
                self.peak_mib = peak_resident_mib() - self.base_mib

    def result(self) -> dict[str, float]:
        (w0, c0), (w1, c1) = self.marks[0], self.marks[-1]
        n = len(self.marks) - 1
        return {
            "steps_s": n / (w1 - w0),
            "steps_cpu_s": n / (c1 - c0),
            "peak_mib": self.peak_mib,
            "first_loss": self.first_loss,
            "threads": torch.get_num_threads(),
        }


def memory_base(device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return resident_mib()


def child_lmforge(a, folder: Path, out_dir: Path) -> dict[str, float]:
    """lmforge's fine-tuning path on the imported folder (what ``lm.training.child.run_finetune`` does for
    ``finetune.task=sft`` with LoRA, with these batches instead of chat data)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lm.config import Config, FinetuneConfig, LoraConfig, TrainerConfig
    from lm.finetune.lora import apply_lora, merge_lora, save_adapter
    from lm.finetune.sft import SFTModule, collate
    from lm.models.hf import load_hf
    from lm.training.child import fit_and_save

    device = torch.device(a.device)
    ids = token_batches(a)
    # Targets: the next token, none after the last (the tokens Hugging Face's shifted labels learn).
    targets = torch.cat([ids[:, 1:], torch.full((len(ids), 1), -100)], dim=1)
    examples = list(zip(ids, targets, strict=True))

    class Batches(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(examples, batch_size=a.batch, collate_fn=collate(0))

        def val_dataloader(self):
            return DataLoader(examples[: a.batch], batch_size=a.batch, collate_fn=collate(0))

    lora = LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0, target_modules=TARGETS)
    cfg = Config(
        finetune=FinetuneConfig(
            task="sft",
            lora=lora,
            max_steps=a.steps,
            batch_size=a.batch,
            lr=LR,
            betas=BETAS,
            weight_decay=WEIGHT_DECAY,
            warmup_steps=0,
            val_every=10**9,
            ckpt_every=10**9,
            keep_last=1,
            resume="never",
        ),
        trainer=TrainerConfig(accelerator=a.device, devices=1, precision="32-true"),
    )
    pl.seed_everything(cfg.finetune.seed, workers=True, verbose=False)
    clock = StepClock(a, device, memory_base(device))

    class Timer(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.mark(trainer.global_step, outputs["loss"])

    net = apply_lora(load_hf(folder).train(), lora)
    fit_and_save(
        cfg,
        "finetune",
        SFTModule(net, cfg.finetune),
        Batches(),
        out_dir,
        tokens_per_batch=a.batch * a.seq_len,
        describe="benchmark",
        meta={"task": "sft"},
        train_examples=len(examples),
        callbacks=[Timer()],
        to_save=merge_lora,
        also_save=save_adapter,
    )
    return clock.result()


def child_transformers_peft(a, folder: Path) -> dict[str, float]:
    """``Qwen2ForCausalLM`` under ``peft.get_peft_model`` in a plain loop: forward with labels, backward,
    AdamW step, zero_grad."""
    import peft
    from transformers import Qwen2ForCausalLM

    device = torch.device(a.device)
    ids = token_batches(a)
    clock = StepClock(a, device, memory_base(device))
    model = Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).to(
        device
    )
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    for step in range(1, a.steps + 1):
        x = ids[(step - 1) * a.batch : step * a.batch].to(device)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark(step, loss.detach())
    return clock.result()


def run_child(a, name: str, folder: Path) -> dict[str, float]:
    """One contender in a fresh process of its own; its RESULT line."""
    cmd = [
        sys.executable, __file__, "--child", name, "--model-dir", str(folder), "--steps", str(a.steps),
        "--warmup", str(a.warmup), "--threads", str(a.threads), "--device", a.device,
        "--seq-len", str(a.seq_len), "--batch", str(a.batch),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def bench_decode(a, folder: Path) -> tuple[dict[str, dict[str, float]], bool]:
    """Best tokens/s per contender by each clock, and whether both produced the same tokens."""
    import transformers

    from lm.generation.sampling import SamplingParams, generate
    from lm.models.hf import load_hf

    transformers.logging.set_verbosity_error()
    device = torch.device(a.device)
    ours = load_hf(folder).to(device).eval()
    hf = transformers.Qwen2ForCausalLM.from_pretrained(
        folder, attn_implementation="sdpa", dtype=torch.float32
    )
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # run every token, as lmforge does without eos_ids
    hf.generation_config.pad_token_id = 0
    prompt = torch.randint(0, 32000, (a.prompt_tokens,), generator=torch.Generator().manual_seed(1))
    x = prompt[None].to(device)
    mask = torch.ones_like(x)

    def run_hf(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(
                x, attention_mask=mask, do_sample=False, use_cache=True, max_new_tokens=n, min_new_tokens=n
            )
        return out[0, a.prompt_tokens :].tolist()

    contenders = {
        "lmforge": lambda n: (
            generate(ours, [prompt.tolist()], SamplingParams(max_new_tokens=n, temperature=0))[0].ids
        ),
        "transformers": run_hf,
    }
    outputs = {name: run(16) for name, run in contenders.items()}  # warm-up
    best = {clock: dict.fromkeys(contenders, 0.0) for clock in ("wall", "cpu")}
    for r in range(a.rounds):
        for name, run in contenders.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = run(a.new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = len(outputs[name]) / (time.perf_counter() - t0)
            cpu = len(outputs[name]) / (time.process_time() - c0)
            best["wall"][name] = max(best["wall"][name], wall)
            best["cpu"][name] = max(best["cpu"][name], cpu)
            print(
                f"decode round {r + 1}/{a.rounds}: {name:<13} {wall:7.1f} tokens/s {cpu:7.1f} tokens/cpu-s",
                flush=True,
            )
    same = outputs["lmforge"] == outputs["transformers"] and len(outputs["lmforge"]) == a.new_tokens
    return best, same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per contender and round")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps (timing runs from the end of this step)"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each contender keeps its best")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--only", default="finetune,decode", help="comma-separated parts: finetune, decode")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)  # one contender, in its own process
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not 1 <= a.warmup < a.steps:
        p.error(f"--warmup must be at least 1 and below --steps ({a.steps}): got {a.warmup}")
    torch.set_num_threads(a.threads)
    if a.device == "cuda":
        torch.set_float32_matmul_precision("high")  # as lm.training.child does, for both sides

    if a.child:
        # Everything either side imports is imported before the memory baseline, on both sides.
        import lightning.pytorch  # noqa: F401
        import peft  # noqa: F401
        import transformers

        import lm.finetune.sft  # noqa: F401
        import lm.models.hf  # noqa: F401
        import lm.training.child  # noqa: F401

        transformers.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as out:
            if a.child == "lmforge":
                result = child_lmforge(a, Path(a.model_dir), Path(out))
            else:
                result = child_transformers_peft(a, Path(a.model_dir))
        print(RESULT + json.dumps(result), flush=True)
        return

    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's and from_pretrained's bars
    parts = set(a.only.split(","))
    fig: dict[str, object] = {
        "device": torch.cuda.get_device_name() if a.device == "cuda" else f"cpu-{a.threads}threads",
        "goal_clock": "wall" if a.device == "cuda" else "process-cpu",
    }
    goals: list[tuple[str, str]] = []  # (figure, >= or <=): each compared with 1.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2"
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(qwen2_config(a.seq_len))
        fig["params_M"] = round(sum(t.numel() for t in model.parameters()) / 1e6, 2)
        model.save_pretrained(folder)
        del model
        suffix = "_cpu" if a.device == "cpu" else ""

        if "finetune" in parts:
            best: dict[str, dict[str, float]] = {}
            for r in range(a.rounds):
                for name in CONTENDERS:
                    res = run_child(a, name, folder)
                    print(
                        f"finetune round {r + 1}/{a.rounds}: {name:<17} {res['steps_s']:.3f} steps/s "
                        f"{res['steps_cpu_s']:.3f} steps/cpu-s peak {res['peak_mib']:.0f} MiB "
                        f"first loss {res['first_loss']:.5f} threads {res['threads']}",
                        flush=True,
                    )
                    b = best.setdefault(name, dict(res))
                    b["steps_s"] = max(b["steps_s"], res["steps_s"])
                    b["steps_cpu_s"] = max(b["steps_cpu_s"], res["steps_cpu_s"])
                    b["peak_mib"] = min(b["peak_mib"], res["peak_mib"])
            ours, theirs = best["lmforge"], best["transformers_peft"]
            fig.update(seq_len=a.seq_len, batch=a.batch, timed_steps=a.steps - a.warmup, rounds=a.rounds)
            for name, b in best.items():
                fig[f"{name}_steps_s"] = round(b["steps_s"], 4)
                fig[f"{name}_steps_cpu_s"] = round(b["steps_cpu_s"], 4)
            fig["ratio_vs_transformers_peft"] = round(ours["steps_s"] / theirs["steps_s"], 3)
            fig["ratio_vs_transformers_peft_cpu"] = round(ours["steps_cpu_s"] / theirs["steps_cpu_s"], 3)
            for name, b in best.items():
                fig[f"{name}_peak_mib"] = round(b["peak_mib"], 1)
            fig["memory_ratio_vs_transformers_peft"] = round(ours["peak_mib"] / theirs["peak_mib"], 3)
            # Same weights, same first batch, adapters that start as zero: the same first loss.
            fig["same_first_loss"] = abs(ours["first_loss"] - theirs["first_loss"]) < 1e-4
            goals += [
                ("ratio_vs_transformers_peft" + suffix, ">="),
                ("memory_ratio_vs_transformers_peft", "<="),
            ]

        if "decode" in parts:
            best_decode, same = bench_decode(a, folder)
            fig.update(prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens)
            for clock, sfx in (("wall", ""), ("cpu", "_cpu")):
                b = best_decode[clock]
                fig[f"lmforge_decode_tokens{sfx}_s"] = round(b["lmforge"], 1)
                fig[f"transformers_decode_tokens{sfx}_s"] = round(b["transformers"], 1)
                fig[f"decode_ratio_vs_transformers{sfx}"] = round(b["lmforge"] / b["transformers"], 3)
            fig["same_tokens"] = same
            goals.append(("decode_ratio_vs_transformers" + suffix, ">="))

    for key, op in goals:  # the goals: every ratio on the right side of 1
        held = fig[key] >= 1.0 if op == ">=" else fig[key] <= 1.0
        print(f"goal {key} {op} 1.0: {fig[key]} -> {'met' if held else 'MISSED'}")
    print(" ".join(f"{k}={v}" for k, v in fig.items()))


if __name__ == "__main__":
    main()
