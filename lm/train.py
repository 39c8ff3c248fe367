"""The training entry point: ``python -m lm.train pretrain|finetune ...``, one process per rank.

Run as its own process (not inside a Prefect task) because Lightning's ddp launcher re-executes
``sys.argv`` for each extra rank (Lightning-AI/pytorch-lightning#7699). Under ``torchrun`` or SLURM
Lightning detects the external launcher and the same command line works unchanged:

    python -m lm.train pretrain --config RESOLVED.yaml --data TOKENS --out OUT [--run-id ID --tracking-uri URI]
    python -m lm.train finetune --config RESOLVED.yaml --data FT --tokens TOKENS --init PRETRAIN_OUT --out OUT

On success OUT holds model.safetensors + model.json, checkpoints/, metrics.json, samples.txt
(pretrain) and config.yaml, and the process exits 0. A user-facing failure (bad config or data,
divergence) prints one ``lmforge: error: ...`` line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lm.config import Config, load_config
from lm.errors import ConfigError, LmforgeError, TrainingError

PROMPTS = ["def ", "The ", "import ", "class "]


def _is_rank_zero() -> bool:
    # Before the Trainer exists: Lightning's launched children and torchrun ranks carry these variables.
    return (
        int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0
        and int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0) == 0
    )


def _atomic_write_text(path: Path, text: str) -> None:
    from lm.stage import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def build_strategy(strategy: str):
    """Config value -> Lightning strategy; ``fsdp`` wraps each transformer Block (its own FSDP unit)."""
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lm.model import Block

        # use_orig_params keeps parameter names (weight-decay groups) and lets tied weights share one unit.
        return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", use_orig_params=True)
    return strategy


def compile_network(net: nn.Module, strategy: str) -> None:
    """torch.compile in place, so parameter names (and checkpoints) stay those of the plain module.

    Under FSDP each transformer block is compiled on its own, before wrapping: the FSDP units are
    the blocks, and a graph never has to span their all-gathers (the torchtitan recipe).
    """
    if strategy == "fsdp":
        layers = net.backbone.layers if hasattr(net, "backbone") else net.layers
        for block in layers:
            block.compile()
    else:
        net.compile()


def _logger(run_id: str | None, tracking_uri: str | None, cfg: Config):
    if not run_id:
        return False
    from lightning.pytorch.loggers import MLFlowLogger

    # An explicit URI always: MLFlowLogger's fallback file:./mlruns is refused by MLflow 3 (mlflow#23637).
    return MLFlowLogger(tracking_uri=tracking_uri or cfg.tracking_uri(), run_id=run_id, log_model=False)


def load_weights_into(net: nn.Module, source: str | os.PathLike) -> None:
    """Load a model folder (model.safetensors), a .safetensors file or a Lightning checkpoint into ``net``."""
    from safetensors.torch import load_file

    src = Path(source)
    if src.is_dir():
        src = src / "model.safetensors"
    if not src.is_file():
        raise ConfigError(f"init_from: {src} does not exist (give a model folder or a .ckpt checkpoint)")
    if src.suffix == ".safetensors":
        state = load_file(str(src))
    else:
        ckpt = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if state and all(k.startswith("backbone.") for k in state):  # a classifier's folder: take its backbone
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    target = net.backbone if hasattr(net, "backbone") else net
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ConfigError(
            f"init_from {src}: shapes differ from the configured model ({str(e)[:300]})"
        ) from None
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(
            f"init_from {src}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def weights_digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _trainer(
    cfg: Config,
    out_dir: Path,
    *,
    max_steps: int,
    logger,
    callbacks: list,
    plugins: list,
    distributed_sampler: bool = False,
):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar

    t = cfg.trainer
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves alone
    # tqdm, redrawn every log_every steps: cheap per step, and readable when stderr is a log stream.
    callbacks = [*callbacks, TQDMProgressBar(refresh_rate=max(1, t.log_every))]
    if t.strategy == "fsdp" and t.accelerator == "cpu":
        raise ConfigError(
            "trainer.strategy=fsdp needs GPUs (trainer.accelerator=cuda or auto); on CPU use ddp"
        )
    try:
        return pl.Trainer(
            accelerator=t.accelerator,
            strategy=build_strategy(t.strategy),
            devices=t.devices,
            num_nodes=t.num_nodes,
            precision=t.precision,
            max_steps=max_steps,
            max_epochs=-1,
            logger=logger,
            callbacks=callbacks,
            plugins=plugins,
            log_every_n_steps=t.log_every,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            check_val_every_n_epoch=None,
            val_check_interval=max(1, cfg.pretrain.val_every),  # set again once accumulation is known
            # Pretraining's WindowSampler splits the data over ranks itself (and must stay resumable).
            use_distributed_sampler=distributed_sampler,
            default_root_dir=str(out_dir),
            enable_model_summary=False,
        )
    except (ValueError, TypeError) as e:  # Lightning's MisconfigurationException is a ValueError
        raise ConfigError(
            f"trainer section (accelerator={t.accelerator}, strategy={t.strategy}, devices={t.devices}, "
            f"num_nodes={t.num_nodes}, precision={t.precision}): {e}"
        ) from None


def _export_weights(trainer, module, final_ckpt: Path | None) -> nn.Module:
    """The final network with full weights on rank 0 (under FSDP, read back from the full checkpoint)."""
    from lightning.pytorch.strategies import FSDPStrategy

    net = module.net
    if isinstance(trainer.strategy, FSDPStrategy):
        if final_ckpt is None:
            raise TrainingError("FSDP run ended without a final checkpoint to export weights from")
        import copy

        from lm.model import SequenceClassifier, build_model

        ckpt = torch.load(final_ckpt, map_location="cpu", weights_only=True, mmap=True)
        state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        fresh = build_model(copy.deepcopy(net.args)) if not isinstance(net, SequenceClassifier) else None
        if fresh is None:
            fresh = SequenceClassifier(build_model(copy.deepcopy(net.args)), net.num_classes)
        fresh.load_state_dict(state, strict=False)
        net = fresh
    return net


def _tokenizer_path(tokens_dir: Path, index: dict) -> Path:
    return tokens_dir / index.get("tokenizer", "tokenizer.json")


def _token_meta(tokens_dir: Path, index: dict) -> dict:
    """What a saved model needs to read and write text: its special token ids and tokenizer."""
    return {
        "eot_id": index.get("eot_id"),
        "pad_id": index.get("pad_id"),
        "mask_id": index.get("mask_id"),
        "tokenizer": str(_tokenizer_path(tokens_dir, index).resolve()),
    }


def _fit(trainer, module, dm, ckpt_path: Path | None) -> float:
    """Train (resuming from ``ckpt_path``), then validate the final weights if the last step was not
    validated, so metrics.json reports the weights that are saved. Returns the seconds it took."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        if module.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=dm, verbose=False)
    return time.perf_counter() - t0


def _final_metrics(trainer, module, throughput, n_params: int, elapsed: float, print_digest: bool) -> dict:
    """What metrics.json reports; with ``print_digest`` every rank prints its weights' sha256 first
    (the pipeline checks that DDP ranks agree)."""
    if print_digest and not _is_fsdp(trainer):
        print(f"lmforge: rank {trainer.global_rank} weights sha256 {weights_digest(module.net)}", flush=True)
    tokens_per_s = throughput.total_tokens / throughput.total_time if throughput.total_time else float("nan")
    return {
        "train/loss": module.last_train_loss,
        **module.last_val,
        "tokens_per_s": tokens_per_s,
        "steps": float(trainer.global_step),
        "params": float(n_params),
        "train_seconds": elapsed,
    }


def run_pretrain(
    cfg: Config,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    print_weight_digest: bool = False,
    extra_callbacks: list | None = None,
) -> dict[str, float]:
    """Pretrain the configured decoder/encoder on a token data dir; returns the final metrics (rank 0).

    ``extra_callbacks``: Lightning callbacks added to the Trainer (benchmarks, tests)."""
    import lightning.pytorch as pl

    from lm.checkpoint import CKPT_DIR, AtomicCheckpointIO, StepCheckpoint, latest_valid_checkpoint
    from lm.datamodule import TokenDataModule, read_token_index
    from lm.lit import LanguageModelModule, SampleWriter, ThroughputMonitor
    from lm.model import build_model, count_params, flops_per_token, resolve_model_config, save_model

    p, data_dir, out_dir = cfg.pretrain, Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = read_token_index(data_dir)
    args = resolve_model_config(cfg.model, int(index["vocab_size"]))
    if _is_rank_zero():
        _atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    pl.seed_everything(p.seed, workers=True, verbose=False)
    net = build_model(args)
    if p.init_from:
        load_weights_into(net, p.init_from)
    if p.compile:
        compile_network(net, cfg.trainer.strategy)

    tokens_per_micro = p.batch_size * args.seq_len
    ckpt_cb = StepCheckpoint(out_dir / CKPT_DIR, p.ckpt_every, p.keep_last)
    throughput = ThroughputMonitor(tokens_per_micro, flops_per_token(args), window=cfg.trainer.log_every)
    callbacks: list[pl.Callback] = [ckpt_cb, throughput, *(extra_callbacks or [])]
    if args.kind == "decoder" and _tokenizer_path(data_dir, index).is_file():
        callbacks.append(
            SampleWriter(
                _tokenizer_path(data_dir, index),
                out_dir / "samples.txt",
                PROMPTS,
                eot_id=index.get("eot_id"),
                every=p.sample_every,
                seed=p.seed,
            )
        )
    trainer = _trainer(
        cfg,
        out_dir,
        max_steps=p.max_steps,
        logger=_logger(run_id, tracking_uri, cfg),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    world = trainer.world_size
    accum = 1
    if p.tokens_per_step:
        accum = max(1, math.ceil(p.tokens_per_step / (tokens_per_micro * world)))
    trainer.accumulate_grad_batches = accum
    trainer.val_check_interval = p.val_every * accum  # counted in micro-batches

    module = LanguageModelModule(
        net,
        lr=p.lr,
        weight_decay=p.weight_decay,
        betas=p.betas,
        warmup_steps=p.warmup_steps,
        max_steps=p.max_steps,
        min_lr_ratio=p.min_lr_ratio,
        grad_clip=p.grad_clip,
        check_every=math.gcd(cfg.trainer.log_every, p.ckpt_every),
    )
    ckpt_cb.before_save = module.raise_if_diverged
    dm = TokenDataModule(
        data_dir,
        args.seq_len,
        p.batch_size,
        p.seed,
        kind=args.kind,
        mlm_probability=p.mlm_probability,
        train_samples=p.max_steps * accum * p.batch_size,
        val_batches=p.val_batches,
    )

    ckpt_path = None
    if p.resume == "auto":
        ckpt_path = latest_valid_checkpoint(out_dir / CKPT_DIR)
    elif p.resume != "never":
        ckpt_path = Path(p.resume)
        if not ckpt_path.is_file():
            raise ConfigError(
                f"pretrain.resume={p.resume!r}: no such checkpoint (use auto, never or a .ckpt path)"
            )
    n_params = count_params(net)
    if trainer.is_global_zero:
        print(
            f"lmforge: pretrain {args.kind} {n_params / 1e6:.2f}M params, world {world}, micro-batch "
            f"{p.batch_size}x{args.seq_len}, accumulation {accum} ({tokens_per_micro * world * accum} tokens/step), "
            f"{p.max_steps} steps" + (f", resuming from {ckpt_path}" if ckpt_path else ""),
            flush=True,
        )
    elapsed = _fit(trainer, module, dm, ckpt_path)
    metrics = _final_metrics(trainer, module, throughput, n_params, elapsed, print_weight_digest)
    if trainer.is_global_zero:
        net_out = _export_weights(trainer, module, ckpt_cb.last_path)
        save_model(net_out, out_dir, extra=_token_meta(data_dir, index))
        _atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        print(f"lmforge: done {json.dumps(metrics, sort_keys=True)}", flush=True)
    return metrics


def _is_fsdp(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def run_finetune(
    cfg: Config,
    ft_dir: str | os.PathLike,
    tokens_dir: str | os.PathLike,
    init: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    print_weight_digest: bool = False,
) -> dict[str, float]:
    """Fine-tune a SequenceClassifier on a pretrained backbone; returns the final metrics (rank 0)."""
    import lightning.pytorch as pl

    from lm.checkpoint import CKPT_DIR, AtomicCheckpointIO, StepCheckpoint
    from lm.datamodule import ClassificationDataModule, read_token_index
    from lm.lit import ClassifierModule, ThroughputMonitor
    from lm.model import (
        SequenceClassifier,
        build_model,
        count_params,
        flops_per_token,
        load_model,
        resolve_model_config,
        save_model,
    )

    f, ft_dir, tokens_dir, out_dir = cfg.finetune, Path(ft_dir), Path(tokens_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        _atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    pl.seed_everything(f.seed, workers=True, verbose=False)
    index = read_token_index(tokens_dir)
    init = init or cfg.pretrain.init_from
    if init and (Path(init) / "model.json").is_file():
        backbone = load_model(init)  # its own shape, whatever cfg.model says
        if hasattr(backbone, "backbone"):
            backbone = backbone.backbone
        backbone.train()
    else:
        backbone = build_model(resolve_model_config(cfg.model, int(index["vocab_size"])))
        if init:
            load_weights_into(backbone, init)
    args = backbone.args
    dm = ClassificationDataModule(
        ft_dir,
        _tokenizer_path(tokens_dir, index),
        args.seq_len,
        f.batch_size,
        f.seed,
        pad_id=int(index["pad_id"]),
    )
    net = SequenceClassifier(backbone, dm.num_classes)
    if not args.tie_embeddings:
        # The LM head plays no part in classification; frozen, DDP does not wait for its gradient.
        backbone.lm_head.weight.requires_grad_(False)
    if cfg.pretrain.compile:
        compile_network(net, cfg.trainer.strategy)

    ckpt_cb = StepCheckpoint(out_dir / CKPT_DIR, cfg.pretrain.ckpt_every, cfg.pretrain.keep_last)
    throughput = ThroughputMonitor(
        f.batch_size * args.seq_len, flops_per_token(args), window=cfg.trainer.log_every
    )
    trainer = _trainer(
        cfg,
        out_dir,
        max_steps=f.max_steps,
        logger=_logger(run_id, tracking_uri, cfg),
        callbacks=[ckpt_cb, throughput],
        plugins=[AtomicCheckpointIO()],
        distributed_sampler=True,  # a shuffled map-style set: Lightning's DistributedSampler splits it
    )
    n_train = len(dm._load("train"))
    steps_per_epoch = math.ceil(n_train / (f.batch_size * trainer.world_size))
    trainer.val_check_interval = max(1, min(steps_per_epoch, cfg.pretrain.val_every))
    module = ClassifierModule(
        net,
        freeze_backbone=f.freeze_backbone,
        lr=f.lr,
        weight_decay=f.weight_decay,
        betas=cfg.pretrain.betas,
        warmup_steps=f.warmup_steps,
        max_steps=f.max_steps,
        min_lr_ratio=cfg.pretrain.min_lr_ratio,
        grad_clip=cfg.pretrain.grad_clip,
        check_every=math.gcd(cfg.trainer.log_every, cfg.pretrain.ckpt_every),
    )
    ckpt_cb.before_save = module.raise_if_diverged
    if trainer.is_global_zero:
        print(
            f"lmforge: finetune {dm.num_classes}-class classifier, {count_params(net) / 1e6:.2f}M params, "
            f"{n_train} train examples, {f.max_steps} steps",
            flush=True,
        )
    elapsed = _fit(trainer, module, dm, None)
    metrics = _final_metrics(trainer, module, throughput, count_params(net), elapsed, print_weight_digest)
    if trainer.is_global_zero:
        net_out = _export_weights(trainer, module, ckpt_cb.last_path)
        save_model(net_out, out_dir, extra={"labels": dm.label_names, **_token_meta(tokens_dir, index)})
        _atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        print(f"lmforge: done {json.dumps(metrics, sort_keys=True)}", flush=True)
    return metrics


def _quiet_lightning_tips() -> None:
    """Lightning advertises cloud services on every start; our users read a log, not ads."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in str(record.msg)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pretrain", "finetune"):
        sp = sub.add_parser(name, help=f"{name} (see module docstring)")
        sp.add_argument("--config", required=True, help="resolved config YAML")
        sp.add_argument("--data", required=True, help="token data dir (pretrain) or fine-tune data dir")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument(
            "--run-id", default=None, help="MLflow run to log metrics into (rank 0); none: no MLflow"
        )
        sp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: config / env)")
        sp.add_argument(
            "--print-weight-digest",
            action="store_true",
            help="every rank prints a sha256 of its final weights (distributed tests)",
        )
        sp.add_argument(
            "--override", "-o", action="append", default=[], help="section.key=value (repeatable)"
        )
        if name == "finetune":
            sp.add_argument("--tokens", required=True, help="token data dir (tokenizer.json, ids)")
            sp.add_argument("--init", default=None, help="pretrained model folder or checkpoint")
    a = parser.parse_args(argv)
    _quiet_lightning_tips()
    try:
        cfg = load_config(a.config, a.override)
        if a.command == "pretrain":
            run_pretrain(
                cfg,
                a.data,
                a.out,
                run_id=a.run_id,
                tracking_uri=a.tracking_uri,
                print_weight_digest=a.print_weight_digest,
            )
        else:
            run_finetune(
                cfg,
                a.data,
                a.tokens,
                a.init,
                a.out,
                run_id=a.run_id,
                tracking_uri=a.tracking_uri,
                print_weight_digest=a.print_weight_digest,
            )
    except LmforgeError as e:
        # Every rank meets the same error (the divergence flag is all-reduced): say it once.
        if _is_rank_zero():
            print(f"lmforge: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
