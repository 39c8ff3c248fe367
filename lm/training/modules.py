"""LightningModules: they receive a network from lm.models.transformer and own the loss, optimiser, schedule and metrics.

Metric names: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``val/loss``, ``val/ppl`` (pretrain);
a fine-tuning method's module (``lm/finetune/``) adds its own ``val/`` names; ``throughput/tokens_per_s``
and ``throughput/mfu`` come from :class:`ThroughputMonitor`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lm.config import TrainingConfig
from lm.errors import TrainingError
from lm.generation.sampling import SamplingParams, generate


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matmul weights; none on norms, biases, embeddings (by name, so the
    rule also holds for FSDP's flattened views)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():  # a tied lm_head appears once, as embed_tokens.weight
        if not p.requires_grad:
            continue
        if name.endswith(("norm.weight", "bias")) or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class OptimisedModule(pl.LightningModule):
    """What every training method shares: AdamW + warmup/cosine over ``train.max_steps``, clipping
    with the gradient norm logged, and the divergence check. A method's LightningModule subclasses
    it, owns ``self.net`` and defines ``batch_loss`` and its validation."""

    def __init__(self, net: nn.Module, train: TrainingConfig, check_every: int = 1):
        super().__init__()
        self.net = net
        self.lr, self.weight_decay, self.betas = train.lr, train.weight_decay, tuple(train.betas)
        self.warmup_steps, self.max_steps, self.min_lr_ratio = (
            train.warmup_steps,
            train.max_steps,
            train.min_lr_ratio,
        )
        self.grad_clip, self.check_every = train.grad_clip, max(1, check_every)
        self.seed = train.seed  # dropout's seed per micro-batch (on_train_batch_start)
        self.last_val_step = -1  # global step of the latest validation
        self.last_val: dict[str, float] = {}  # the latest validation's metrics (rank-reduced)
        self._nonfinite: torch.Tensor | None = None  # device flag: a loss was NaN/inf since the last check
        self.last_train_loss = float("nan")
        self._last_loss: torch.Tensor | None = None
        self.step_metrics: dict[str, float] = {}  # the latest training scalars (progress bar)
        self._pending: dict[str, float] = {}  # this log step's scalars, sent to the logger at its end
        self._pending_step = 0

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            param_groups(self, self.weight_decay),
            lr=self.lr,
            betas=self.betas,
            # Fused kernels on GPU; on CPU one multi-tensor call per step instead of a few per
            # parameter (what a small model's step spends much of its time on).
            fused=self.device.type == "cuda",
            foreach=self.device.type != "cuda",
        )
        # Built from max_steps, not trainer.estimated_stepping_batches, which breaks loader-state
        # restore on resume (Lightning-AI/pytorch-lightning#20550).
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def batch_loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self._track_loss(loss)
        if self._is_log_step():
            self.record({"train/loss": loss.detach()}, self.global_step + 1)
        self._last_loss = loss.detach()
        return loss

    def record(self, metrics: dict[str, Any], step: int) -> None:
        """Training scalars of this log step (callbacks add theirs). They reach the logger in one
        call when the step ends, not through ``self.log``: Lightning keeps a torchmetrics state per
        logged key and walks it on every call, which cost a 0.1M-parameter model 4% of its time."""
        self._pending.update({k: float(v) for k, v in metrics.items()})
        self._pending_step = step  # counted in finished optimizer steps
        self.step_metrics.update(self._pending)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._pending and self.trainer.global_step >= self._pending_step:  # the optimizer step is done
            for logger in self.loggers:
                logger.log_metrics(self._pending, step=self._pending_step)
            self._pending = {}

    def on_train_end(self) -> None:
        if self._last_loss is not None:
            self.last_train_loss = float(self._last_loss)

    def _track_loss(self, loss: torch.Tensor) -> None:
        # Accumulate a device-side flag instead of syncing every step (a .item() per step stalls the
        # GPU queue); it is read at log steps and before every checkpoint.
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else (self._nonfinite | bad)
        step = self.global_step + 1  # the optimizer step this micro-batch belongs to
        if step % self.check_every == 0 or step >= self.max_steps:
            self.raise_if_diverged()

    def raise_if_diverged(self, *_: Any) -> None:
        if self._nonfinite is None:
            return
        flag = self._nonfinite.float()
        if self.trainer is not None and self.trainer.world_size > 1:
            # Every rank must raise together, or the others would wait forever in the next all-reduce.
            flag = self.trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() > 0:
            raise TrainingError(
                f"training diverged: the loss became NaN or infinite at or before step {self.global_step + 1}; "
                f"no checkpoint was written after that point (lower pretrain.lr, raise warmup_steps, or "
                f"check the data). The last good checkpoint is kept."
            )
        self._nonfinite = None

    def _is_log_step(self) -> bool:
        # Lightning forwards step metrics to the logger only every log_every_n_steps; calling self.log
        # on the other steps costs time (noticeable with small models) for values nobody sees.
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        # Gradients are complete and unscaled here (AMP unscales before this hook); clip them ourselves
        # so the pre-clip norm can be logged.
        from lightning.pytorch.strategies import FSDPStrategy

        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        if isinstance(self.trainer.strategy, FSDPStrategy):
            norm = self.trainer.strategy.model.clip_grad_norm_(max_norm)  # sharded grads: FSDP's own reduce
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        if self._is_log_step():
            self.record(
                {"train/grad_norm": norm, "train/lr": optimizer.param_groups[0]["lr"]}, self.global_step + 1
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout (LoRA's too) draws from torch's global generator. It is seeded here from the
        # micro-batch's place in training (seed, rank, optimizer step, micro-batch of the step), not
        # restored from a checkpoint: Lightning draws from that generator itself between a restore and
        # the next step (every DataLoader iterator takes a base seed from it, and a resumed run starts
        # its iterator after the restore), and a checkpoint holds rank 0's state only. Each rank gets
        # its own masks.
        micro = batch_idx % self.trainer.accumulate_grad_batches
        key = [self.seed, self.global_rank, self.global_step, micro]
        seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
        # Not torch.manual_seed: it visits every backend (120 us a call here, against 1 us).
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # this rank's device


class LanguageModelModule(OptimisedModule):
    """Pretraining of a Decoder (next token) or Encoder (masked tokens): batches are (inputs, targets)."""

    _val_sum: torch.Tensor | None = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.net(idx, targets)

    def batch_loss(self, batch) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        return self.net(x, y)[1]

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(2, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        _, loss = self.net(x, y)
        n = (y != -100).sum()
        self._val_sum += torch.stack([loss.double() * n, n.double()])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")  # token-weighted over ranks
        val_loss = float(total[0] / total[1].clamp(min=1))
        ppl = math.exp(min(val_loss, 50.0))
        # Already reduced over ranks; sync_dist only averages identical values (and keeps Lightning quiet).
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", ppl, sync_dist=True)
        self.last_val = {"val/loss": val_loss, "val/ppl": ppl}
        self.last_val_step = self.global_step
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            print(f"lmforge: step {self.global_step} val/loss {val_loss:.4f} val/ppl {ppl:.2f}", flush=True)


class LossHistory(Logger):
    """``train/loss`` and ``val/loss`` by optimizer step, appended to a CSV in the stage's folder (rank
    0): what the loss-curve figure draws, with or without an MLflow run. A resumed run appends; the
    steps a killed run logged after its last checkpoint come again, and the reader keeps the last."""

    KEYS = ("train/loss", "val/loss")

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "loss_history"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rows = [f"{step},{k},{float(v)!r}\n" for k, v in metrics.items() if k in self.KEYS and step is not None]
        if not rows:
            return
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("step,metric,value\n" if new else "") + "".join(rows))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class TrackedMetrics(Logger):
    """The training scalars to the stage's MLflow run (rank 0), through a queue that never makes
    training wait for the tracking server (``lm.tracking.metric_sender.MetricSender``): what it does
    not take is sent again when it is back; :meth:`close` says what it never took and where that is
    kept."""

    def __init__(self, uri: str, run_id: str, out_dir: Path) -> None:
        from lm.tracking.metric_sender import UNSENT_METRICS, MetricSender

        super().__init__()
        self.run_id = run_id
        self.sender = MetricSender(uri, run_id, Path(out_dir) / UNSENT_METRICS)

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.sender.add({k: v for k, v in metrics.items() if not isinstance(v, str)}, step or 0)

    @rank_zero_only
    def log_text(self, text: str, artifact_file: str) -> None:
        self.sender.add_text(text, artifact_file)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the stage's run has its config as params already

    def close(self) -> str | None:
        """Wait a little for the server to take what is queued; one line on what it did not, or None."""
        return self.sender.close()


class ProgressBar(TQDMProgressBar):
    """tqdm, redrawn every ``log_every`` steps (cheap per step, readable in a log stream), showing the
    training scalars the module recorded and the latest validation."""

    SHOWN = {"train/loss": "loss", "throughput/tokens_per_s": "tok/s"}

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        recorded = getattr(pl_module, "step_metrics", {})
        items.update({short: f"{recorded[key]:.4g}" for key, short in self.SHOWN.items() if key in recorded})
        return items


# ---- callbacks ----------------------------------------------------------------------------------

# Dense bf16/fp16 peak FLOP/s per device (vendor datasheets); MFU is only logged for these.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "4090": 165e12,
    "V100": 125e12,
    "B200": 2250e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


class ThroughputMonitor(pl.Callback):
    """tokens/s over the last ``window`` optimizer steps (all ranks), and MFU when the peak is known."""

    def __init__(self, tokens_per_micro_batch: int, flops_per_token: float, window: int = 10):
        self.tokens_per_micro_batch = tokens_per_micro_batch
        self.flops_per_token = flops_per_token
        self.window = window
        self._t0: float | None = None
        self._tokens = 0
        self._steps = 0
        self._start_step = 0
        self.tokens_per_s: float = float("nan")
        self.total_tokens = 0
        self.total_time = 0.0
        self.peak: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak = device_peak_flops(pl_module.device)
        self._start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += self.tokens_per_micro_batch * trainer.world_size
        if trainer.global_step == self._steps + self._start_step:  # mid-accumulation: same step
            return
        self._steps = trainer.global_step - self._start_step
        if self._steps % self.window and trainer.global_step < (trainer.max_steps or 0):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        # The first window includes warm-up (and compilation); it still counts in the run total.
        self.tokens_per_s = self._tokens / dt
        self.total_tokens += self._tokens
        self.total_time += dt
        throughput = {"throughput/tokens_per_s": self.tokens_per_s}
        if self.peak:
            throughput["throughput/mfu"] = (
                self.tokens_per_s * self.flops_per_token / (self.peak * trainer.world_size)
            )
        if hasattr(pl_module, "record"):
            pl_module.record(throughput, trainer.global_step)
        if trainer.is_global_zero:
            # This step's loss (its last micro-batch's).
            loss = outputs.get("loss") if isinstance(outputs, dict) else None
            loss_s = f" train/loss {float(loss):.4f}" if loss is not None else ""
            print(
                f"lmforge: step {trainer.global_step}{loss_s} tokens/s {self.tokens_per_s:,.0f}", flush=True
            )
        self._t0, self._tokens = time.perf_counter(), 0


class SampleWriter(pl.Callback):
    """After each validation, rank 0 decodes a few generations into samples.txt (and to MLflow)."""

    def __init__(
        self,
        tokenizer_path: str | Path,
        out_path: str | Path,
        prompts: list[str],
        max_new_tokens: int = 48,
        eot_id: int | None = None,
        every: int | None = None,
        seed: int = 0,
    ):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.out_path, self.prompts, self.max_new_tokens = Path(out_path), prompts, max_new_tokens
        self.eot_id, self.every, self.seed = eot_id, every, seed
        self._last_step = -1

    def write(self, trainer: pl.Trainer, net: nn.Module) -> str:
        lines = [f"=== step {trainer.global_step} ==="]
        prompts = [self.tokenizer.encode(p).ids or [self.eot_id or 0] for p in self.prompts]
        # A glance at progress: a model with a short seq_len writes shorter samples.
        params = SamplingParams(
            max_new_tokens=min(self.max_new_tokens, net.args.seq_len // 2),
            temperature=0.8,
            top_k=50,
            seed=self.seed,
        )
        was_training = net.training
        net.eval()
        # Eager even when pretrain.compile is on: every generated length would be a new graph.
        with torch.compiler.set_stance("force_eager"):
            outs = generate(net, prompts, params, eos_ids=[] if self.eot_id is None else [self.eot_id])
        net.train(was_training)
        for prompt, ids, out in zip(self.prompts, prompts, outs, strict=True):
            lines.append(f"--- {prompt!r}\n{self.tokenizer.decode(ids + out.ids)}")
        text = "\n".join(lines) + "\n\n"
        with open(self.out_path, "a", encoding="utf-8") as f:
            f.write(text)
        return text

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        step = trainer.global_step
        if not trainer.is_global_zero or trainer.sanity_checking or step == self._last_step:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            return  # sharded weights: one rank alone cannot run the network (samples come from model.safetensors)
        if self.every and step % self.every and step != trainer.max_steps:
            return
        self._last_step = step
        text = self.write(trainer, pl_module.net)
        if isinstance(trainer.logger, TrackedMetrics):
            trainer.logger.log_text(text, f"samples/step_{step:08d}.txt")
