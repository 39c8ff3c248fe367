"""Preference tuning's memory: the reference model's log-probabilities stored before training (what
``finetune.task=dpo`` does) against the reference network resident beside the trained one (what a
DPO trainer does without precomputed reference log-probabilities, TRL's default).

    python benchmarks/dpo_memory.py                     # CPU, ~6 min on 2 cores
    python benchmarks/dpo_memory.py --device cuda --n-layer 24 --d-model 1024

Both contenders run the real training path on the same data and starting weights: ``lm.finetune.dpo.build``
and ``lm.training.child.fit_and_save`` (Lightning's Trainer, AdamW, full fine-tuning):

- **stored**: as shipped: the DataModule computes the starting model's log-probabilities of every
  pair once, before training, and the module reads them from each batch;
- **resident**: the same module, but it keeps a frozen copy of the starting network and computes
  the reference log-probabilities of each batch with it (no gradient), ignoring the stored ones.

The model is a random decoder (``--n-layer``, ``--d-model``; byte-level vocabulary, so the weights
are nearly all in the blocks); the data are synthetic preference pairs of ``--seq-len``-token
conversations. Each contender runs in a child process of its own (this script with ``--child``), so
its peak is its own: peak RSS (``VmHWM``) at the last training step minus the RSS just before the
model is built (CUDA: ``max_memory_allocated`` minus what was allocated before). Ends with one line
of key=value figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULT = "RESULT "  # a child's last line: RESULT {json}
CONTENDERS = ("stored", "resident")


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mib() -> float:
    """This process image's peak RSS (VmHWM; not ru_maxrss, which Linux carries across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def prepare(a, root: Path) -> Path:
    """A config, a byte-level token dir with its chat template, and the preference splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from lm.config import load_config
    from lm.data.preference import build_preference_data
    from lm.text.tokenize_stage import tokenize

    clean = root / "clean"
    clean.mkdir()
    text = Path(json.__file__).read_text()
    for split in ("train", "val"):
        pq.write_table(pa.table({"doc_id": [split], "source": ["bench"], "text": [text]}), clean / f"{split}.parquet")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = []
    for i in range(a.pairs):
        reply = " ".join(words[(i + k) % len(words)] for k in range(a.seq_len // 8))
        rows.append({"prompt": f"Question {i}: say some words.", "chosen": f"Sure: {reply}.", "rejected": f"No: {reply[::-1]}"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = {
        "workdir": str(root),
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": a.n_layer, "n_head": a.d_model // 64, "d_model": a.d_model, "seq_len": a.seq_len},
        "finetune": {"task": "dpo", "data": str(root / "pairs.jsonl"), "max_steps": a.steps, "batch_size": a.batch,
                     "val_every": 10_000, "ckpt_every": 10_000, "warmup_steps": 0},
        "trainer": {"accelerator": a.device, "devices": 1, "log_every": 1, "precision": a.precision},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(root / "config.yaml")
    (root / "tokens").mkdir()
    tokenize(cfg, clean, out_dir=root / "tokens")
    (root / "data").mkdir()
    build_preference_data(cfg, out_dir=root / "data")
    return root / "config.yaml"


def child(a, root: Path) -> dict[str, float]:
    import lightning.pytorch as pl

    from lm.config import load_config
    from lm.finetune import dpo
    from lm.models.folder import build_model
    from lm.models.transformer import model_args
    from lm.text.shards import TokenIndex
    from lm.training.child import fit_and_save

    class ResidentReference(dpo.DPOModule):
        """The reference as a second, frozen network beside the trained one, run on every batch."""

        def __init__(self, net, train, settings, reference):
            super().__init__(net, train, settings)
            self.__dict__["reference"] = reference.requires_grad_(False).eval()  # not a submodule: not checkpointed

        def on_fit_start(self) -> None:
            self.reference.to(self.device)

        def pair_losses(self, batch):
            ids, targets = (dpo.chosen_then_rejected(t) for t in batch[:2])  # the stored reference is not used
            with torch.no_grad():
                reference, _ = dpo.sequence_logps(self.reference(ids)[0], targets)
            logps, counts = dpo.sequence_logps(self.net(ids)[0], targets)
            return dpo.preference_loss(logps, reference, counts, **self.objective)

    class PeakAtLastStep(pl.Callback):
        def __init__(self):
            self.peak, self.t0, self.t1 = float("nan"), 0.0, 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                self.t0 = time.perf_counter()
            if trainer.global_step == trainer.max_steps:
                self.t1 = time.perf_counter()
                cuda = pl_module.device.type == "cuda"
                self.peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_resident_mib()

    cfg = load_config(root / "config.yaml")
    pl.seed_everything(0, verbose=False)
    cuda = a.device == "cuda"
    base = torch.cuda.memory_allocated() / 2**20 if cuda else resident_mib()
    net = build_model(model_args(cfg.model, TokenIndex.load(root / "tokens").vocab_size)).train()
    recipe = dpo.build(cfg, net, root / "data", root / "tokens")
    module = recipe.module
    if a.child == "resident":
        module = ResidentReference(net, cfg.finetune, cfg.finetune.dpo, copy.deepcopy(net))
    peak = PeakAtLastStep()
    out = root / a.child
    fit_and_save(cfg, "finetune", module, recipe.datamodule, out, tokens_per_batch=recipe.tokens_per_batch,
                 describe=f"{a.child} reference", meta={}, callbacks=[peak])
    return {"peak_mib": peak.peak - base, "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "weights_mib": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20,
            "s_per_step": (peak.t1 - peak.t0) / max(a.steps - 1, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="pairs a step (2x sequences)")
    p.add_argument("--pairs", type=int, default=32, help="preference pairs (each child scores them all once)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(RESULT + json.dumps(child(a, Path(a.root))), flush=True)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(a, Path(tmp))
        results = {}
        for name in CONTENDERS:
            argv = [arg for arg in sys.argv[1:]]
            proc = subprocess.run([sys.executable, __file__, *argv, "--child", name, "--root", tmp],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.rsplit(RESULT, 1)[1].splitlines()[0])
            print(f"{name}: {results[name]}", flush=True)
    stored, resident = results["stored"], results["resident"]
    figures = {
        "device": a.device, "params_m": round(stored["params_m"], 2), "weights_mib": round(stored["weights_mib"], 1),
        "stored_peak_mib": round(stored["peak_mib"], 1), "resident_peak_mib": round(resident["peak_mib"], 1),
        "saved_mib": round(resident["peak_mib"] - stored["peak_mib"], 1),
        "stored_s_per_step": round(stored["s_per_step"], 3), "resident_s_per_step": round(resident["s_per_step"], 3),
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
