"""The training entry point: ``python -m lm.training.child pretrain|finetune ...``, one process per rank.

Run as its own process (not inside a Prefect task) because Lightning's ddp launcher re-executes
``sys.argv`` for each extra rank (Lightning-AI/pytorch-lightning#7699). Under ``torchrun`` or SLURM
Lightning detects the external launcher and the same command line works unchanged:

    python -m lm.training.child pretrain --config OUT/config.yaml --data TOKENS --out OUT [--run-id ID --tracking-uri URI]
    python -m lm.training.child finetune --config OUT/config.yaml --data FT --tokens TOKENS --init PRETRAIN_OUT --out OUT

Pretraining and every fine-tuning method share one fit-and-save path (:func:`fit_and_save`): the
stage's training block (``pretrain.*`` or ``finetune.*``, one type) sets steps, optimiser,
checkpoints and resume. On success OUT holds model.safetensors + model.json, checkpoints/,
samples.txt (decoder pretraining), loss_history.csv (train/val loss by step), config.yaml and
result.json (rank 0's final metrics and the saved weights' sha256), and the process exits 0. A
user-facing failure (bad config or data, divergence) prints one ``lmforge: error: ...`` line on
stderr and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lm.config import Config, PretrainConfig, TrainerConfig, TrainingConfig, load_config
from lm.errors import ConfigError, LmforgeError, TrainingError
from lm.fileio import atomic_write, file_sha256, remove_abandoned
from lm.lifetime import die_with_parent, parent_gone
from lm.training.launch import CONFIG, LOSS_HISTORY, RESULT

PROMPTS = ["def ", "The ", "import ", "class "]


# ---- the stage side: launch the training process, read what it left -----------------------------


# ---- the training process ---------------------------------------------------------------------


def _is_rank_zero() -> bool:
    # Before the Trainer exists: Lightning's launched children and torchrun ranks carry these variables.
    return (
        int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0
        and int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0) == 0
    )


def build_strategy(strategy: str):
    """Config value -> Lightning strategy; ``fsdp`` wraps each transformer block (its own FSDP unit):
    the decoder's Block, whatever the family, and each encoder's layer."""
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lm.models.family_table import block_classes

        # use_orig_params keeps parameter names (weight-decay groups) and lets tied weights share one unit.
        return FSDPStrategy(auto_wrap_policy=block_classes(), state_dict_type="full", use_orig_params=True)
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
        import pickle

        try:  # tensors and plain containers only: unpickling anything else runs code (CVE-2024-37052)
            ckpt = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise ConfigError(
                f"init_from {src}: refused: the file holds Python objects beyond tensors, and loading it would "
                "run code. Give a .safetensors file, a model folder, or a checkpoint lmforge wrote."
            ) from None
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
    """sha256 of a network's weights in memory (the DDP tests compare every rank's)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _trainer(t: TrainerConfig, out_dir: Path, *, max_steps: int, logger, callbacks: list):
    import lightning.pytorch as pl

    from lm.training.checkpoint import AtomicCheckpointIO
    from lm.training.modules import ProgressBar

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves alone
    callbacks = [*callbacks, ProgressBar(refresh_rate=t.log_every)]
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
            plugins=[AtomicCheckpointIO()],
            log_every_n_steps=t.log_every,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            check_val_every_n_epoch=None,
            val_check_interval=1,  # set once accumulation and the epoch length are known
            # Our samplers split the data over ranks themselves, and stay resumable (lm.training.pretrain_data).
            use_distributed_sampler=False,
            default_root_dir=str(out_dir),
            enable_model_summary=False,
        )
    except (ValueError, TypeError) as e:  # Lightning's MisconfigurationException is a ValueError
        raise ConfigError(
            f"trainer section (accelerator={t.accelerator}, strategy={t.strategy}, devices={t.devices}, "
            f"num_nodes={t.num_nodes}, precision={t.precision}): {e}"
        ) from None


def _full_state(trainer, final_ckpt: Path | None) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the network's full weights, read back from the final (full) checkpoint on rank 0;
    otherwise None: the network in memory holds them."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    if final_ckpt is None:
        raise TrainingError("FSDP run ended without a final checkpoint to export weights from")
    ckpt = torch.load(final_ckpt, map_location="cpu", weights_only=True, mmap=True)
    return {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def _check_writable(folder: Path) -> None:
    """Fail now, not at the first checkpoint minutes later, when checkpoints cannot be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / ".lmforge-write-check", b"").unlink()
    except OSError as e:
        raise TrainingError(f"checkpoint folder {folder} cannot be written ({e.strerror}): make it writable") from None


def _checkpoint_to_resume(train: TrainingConfig, section: str, ckpt_dir: Path) -> Path | None:
    from lm.training.checkpoint import latest_valid_checkpoint

    if train.resume == "never":
        return None
    if train.resume == "auto":
        return latest_valid_checkpoint(ckpt_dir)
    path = Path(train.resume)
    if not path.is_file():
        raise ConfigError(
            f"{section}.resume={train.resume!r}: no such checkpoint (use auto, never or a .ckpt path)"
        )
    return path


@dataclass
class _Fit:
    """The Trainer, and the callbacks and logger whose state the steps after training read."""

    trainer: Any
    checkpoints: Any  # StepCheckpoint: its last_path is the final checkpoint (FSDP exports from it)
    throughput: Any  # ThroughputMonitor: the tokens and seconds trained
    tracked: Any  # TrackedMetrics, or None without an MLflow run


def fit_and_save(
    cfg: Config,
    section: str,
    module,
    datamodule,
    out_dir: Path,
    *,
    tokens_per_batch: int,
    describe: str,
    meta: dict,
    train_examples: int | None = None,
    callbacks: list | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    print_weight_digest: bool = False,
    to_save=None,
    also_save=None,
) -> dict[str, float]:
    """Train ``module`` (its ``net``) on ``datamodule`` under the ``cfg.<section>`` training block and
    ``cfg.trainer``; resume from the newest valid checkpoint (``resume: auto``); validate the final
    weights; on rank 0 save model.safetensors + model.json (``meta`` added) and result.json.
    ``to_save(net)``: the network to save instead of ``module.net`` (LoRA merged); ``also_save(net, out_dir)``:
    what else rank 0 writes from the trained ``module.net`` (the LoRA adapter itself). Returns the final metrics."""
    from lm.models.transformer import count_params
    from lm.training.checkpoint import CKPT_DIR

    train: TrainingConfig = getattr(cfg, section)
    out_dir = Path(out_dir)
    _prepare_out_dir(cfg, out_dir)
    if train.compile:
        compile_network(module.net, cfg.trainer.strategy)
    fit = _build_fit(cfg, train, module, out_dir, tokens_per_batch, callbacks, run_id, tracking_uri)
    accum = _set_intervals(fit.trainer, module, cfg, train, tokens_per_batch, train_examples)
    ckpt_path = _checkpoint_to_resume(train, section, out_dir / CKPT_DIR)
    n_params = count_params(module.net)  # before fit, while the network is whole (FSDP shards it)
    _announce(fit.trainer, section, describe, train, tokens_per_batch, accum, ckpt_path)
    elapsed = _train(fit, module, datamodule, ckpt_path)
    if print_weight_digest and not _is_fsdp(fit.trainer):
        digest = weights_digest(module.net)
        print(f"lmforge: rank {fit.trainer.global_rank} weights sha256 {digest}", flush=True)
    metrics = _final_metrics(fit, module, n_params, elapsed)
    if fit.trainer.is_global_zero:
        _save_outputs(fit, module, out_dir, meta, metrics, to_save, also_save)
    return metrics


def _prepare_out_dir(cfg: Config, out_dir: Path) -> None:
    """Create the output folder; rank 0 checks that checkpoints can be written, clears a killed run's
    half-written ones and writes config.yaml if the stage did not."""
    from lm.training.checkpoint import CKPT_DIR

    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        _check_writable(out_dir / CKPT_DIR)
        remove_abandoned(out_dir / CKPT_DIR)  # half-written checkpoints of a killed earlier run
        if not (out_dir / CONFIG).exists():  # the stage wrote it when it launched us
            atomic_write(out_dir / CONFIG, cfg.to_yaml())


def _build_fit(
    cfg: Config,
    train: TrainingConfig,
    module,
    out_dir: Path,
    tokens_per_batch: int,
    callbacks: list | None,
    run_id: str | None,
    tracking_uri: str | None,
) -> _Fit:
    """The step checkpoints, the throughput monitor, the loggers and the Trainer that runs them."""
    from lm.models.transformer import flops_per_token
    from lm.training.checkpoint import CKPT_DIR, StepCheckpoint
    from lm.training.modules import ThroughputMonitor

    ckpt_cb = StepCheckpoint(
        out_dir / CKPT_DIR, train.ckpt_every, train.keep_last, before_save=module.raise_if_diverged
    )
    net = module.net
    throughput = ThroughputMonitor(tokens_per_batch, flops_per_token(net.args), window=cfg.trainer.log_every)
    loggers, tracked = _loggers(cfg, out_dir, run_id, tracking_uri)
    trainer = _trainer(
        cfg.trainer,
        out_dir,
        max_steps=train.max_steps,
        logger=loggers,
        callbacks=[ckpt_cb, throughput, *(callbacks or [])],
    )
    return _Fit(trainer, ckpt_cb, throughput, tracked)


def _loggers(cfg: Config, out_dir: Path, run_id: str | None, tracking_uri: str | None) -> tuple[list, Any]:
    """The MLflow run's logger (if there is a run) and the loss history; -> (loggers, the MLflow one)."""
    from lm.training.modules import LossHistory

    loggers: list = []
    tracked = None
    if run_id:  # first: trainer.logger is the MLflow run (SampleWriter logs its texts there)
        from lm.training.modules import TrackedMetrics

        # Not Lightning's MLFlowLogger: its calls block training while the server is away, and the
        # last failed one ends it. An explicit URI always (MLflow 3 refuses file:./mlruns, mlflow#23637).
        tracked = TrackedMetrics(tracking_uri or cfg.tracking_uri(), run_id, out_dir)
        loggers.append(tracked)
    loggers.append(LossHistory(out_dir / LOSS_HISTORY))
    return loggers, tracked


def _set_intervals(
    trainer, module, cfg: Config, train: TrainingConfig, tokens_per_batch: int, train_examples: int | None
) -> int:
    """Set gradient accumulation (from ``tokens_per_step``), the validation interval and how often the
    module checks for divergence; -> the accumulation."""
    world = trainer.world_size
    accum = 1
    if train.tokens_per_step:
        accum = max(1, math.ceil(train.tokens_per_step / (tokens_per_batch * world)))
    trainer.accumulate_grad_batches = accum
    interval = train.val_every * accum  # counted in micro-batches
    if train_examples is not None:  # a finite set: Lightning refuses an interval longer than an epoch
        interval = min(interval, max(1, math.ceil(train_examples // world / train.batch_size)))
    trainer.val_check_interval = interval
    module.check_every = math.gcd(cfg.trainer.log_every, train.ckpt_every)
    return accum


def _announce(
    trainer,
    section: str,
    describe: str,
    train: TrainingConfig,
    tokens_per_batch: int,
    accum: int,
    ckpt_path: Path | None,
) -> None:
    """Rank 0's first line: what trains, on how many ranks, how big a step is, and where it resumes from."""
    if not trainer.is_global_zero:
        return
    world = trainer.world_size
    print(
        f"lmforge: {section} {describe}, world {world}, micro-batch {train.batch_size}, accumulation "
        f"{accum} ({tokens_per_batch * world * accum} tokens/step), {train.max_steps} steps"
        + (f", resuming from {ckpt_path}" if ckpt_path else ""),
        flush=True,
    )


def _train(fit: _Fit, module, datamodule, ckpt_path: Path | None) -> float:
    """Fit (resuming from ``ckpt_path``), then validate the final weights if the last validation was
    earlier; close the MLflow logger either way. -> the seconds it took."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            resume = str(ckpt_path) if ckpt_path else None
            fit.trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
            if module.last_val_step != fit.trainer.global_step:  # metrics report the weights that are saved
                fit.trainer.validate(module, datamodule=datamodule, verbose=False)
        return time.perf_counter() - t0
    finally:
        unsent = fit.tracked.close() if fit.tracked is not None else None
        if unsent and fit.trainer.is_global_zero:
            print(f"lmforge: warning: {unsent}", flush=True)


def _final_metrics(fit: _Fit, module, n_params: int, elapsed: float) -> dict[str, float]:
    """The run's final numbers: losses, throughput, steps, size, time, ranks."""
    throughput = fit.throughput
    tokens_per_s = throughput.total_tokens / throughput.total_time if throughput.total_time else float("nan")
    return {
        "train/loss": module.last_train_loss,
        **module.last_val,
        "tokens_per_s": tokens_per_s,
        "steps": float(fit.trainer.global_step),
        "params": float(n_params),
        "train_seconds": elapsed,
        "world_size": float(fit.trainer.world_size),
    }


def _save_outputs(
    fit: _Fit, module, out_dir: Path, meta: dict, metrics: dict[str, float], to_save, also_save
) -> None:
    """Rank 0: the model folder (plus what ``also_save`` writes), then result.json, then the ``done`` line."""
    from lm.models.folder import save_model

    saved = module.net if to_save is None else to_save(module.net)
    state = _full_state(fit.trainer, fit.checkpoints.last_path)
    weights = save_model(saved, out_dir, extra=meta, state=state)
    if also_save is not None:
        also_save(module.net, out_dir)
    result = {"metrics": metrics, "weights_sha256": file_sha256(weights)}
    atomic_write(out_dir / RESULT, json.dumps(result, indent=2, sort_keys=True))
    print(f"lmforge: done {json.dumps(metrics, sort_keys=True)}", flush=True)


def _is_fsdp(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def run_pretrain(
    cfg: Config,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    init: str | os.PathLike | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    print_weight_digest: bool = False,
    extra_callbacks: list | None = None,
) -> dict[str, float]:
    """Pretrain the configured decoder/encoder on a token data dir; returns the final metrics (rank 0).

    ``init``: the base_model stage's folder: continue pretraining the model it holds.
    ``extra_callbacks``: Lightning callbacks added to the Trainer (benchmarks, tests)."""
    import lightning.pytorch as pl

    from lm.models.transformer import count_params
    from lm.text.shards import TokenIndex
    from lm.training.modules import LanguageModelModule
    from lm.training.pretrain_data import TokenDataModule

    p, data_dir = cfg.pretrain, Path(data_dir)
    index = TokenIndex.load(data_dir)
    pl.seed_everything(p.seed, workers=True, verbose=False)
    net = _pretrain_network(cfg, index, init)
    args = net.args
    callbacks = [*(extra_callbacks or []), *_sample_writers(p, args, index, data_dir, Path(out_dir))]
    dm = TokenDataModule(
        data_dir,
        args.seq_len,
        p.batch_size,
        p.seed,
        kind=args.kind,
        mlm_probability=p.mlm_probability,
        val_batches=p.val_batches,
    )
    return fit_and_save(
        cfg,
        "pretrain",
        LanguageModelModule(net, p),
        dm,
        Path(out_dir),
        tokens_per_batch=p.batch_size * args.seq_len,
        describe=f"{args.kind} {count_params(net) / 1e6:.2f}M params",
        meta=index.special_ids(),
        callbacks=callbacks,
        run_id=run_id,
        tracking_uri=tracking_uri,
        print_weight_digest=print_weight_digest,
    )


def _pretrain_network(cfg: Config, index, init: str | os.PathLike | None) -> nn.Module:
    """The network to pretrain: the configured one, freshly initialised or with ``init``'s checkpoint
    weights, or (continued pretraining) the model ``init`` brought from elsewhere, in its own shape."""
    from lm.models.folder import build_model
    from lm.models.transformer import model_args

    source = None
    if init is not None:
        from lm.models.source import read_source

        source = read_source(init)
    if source is not None and source["kind"] != "checkpoint":
        # Continued pretraining of a model brought from elsewhere: its own shape, whatever model.* says.
        from lm.models.source import check_tokenizer_fits

        net = load_backbone(init)
        check_tokenizer_fits(index.vocab_size, net.args.vocab_size, source["spec"])
        return net
    net = build_model(model_args(cfg.model, index.vocab_size))
    if source is not None:
        load_weights_into(net, source["path"])
    return net


def _sample_writers(p: PretrainConfig, args, index, data_dir: Path, out_dir: Path) -> list:
    """[the SampleWriter of samples.txt] for a decoder whose tokenizer is at hand, else []."""
    from lm.training.modules import SampleWriter

    tokenizer = data_dir / index.tokenizer
    if args.kind != "decoder" or not tokenizer.is_file():
        return []
    writer = SampleWriter(
        tokenizer, out_dir / "samples.txt", PROMPTS, eot_id=index.eot_id, every=p.sample_every, seed=p.seed
    )
    return [writer]


def load_backbone(init: str | os.PathLike) -> nn.Module:
    """The pretrained network fine-tuning starts from: a model folder (its own shape, whatever the
    config says), the backbone of a classifier's folder, in training mode."""
    from lm.models.folder import load_model

    if not (Path(init) / "model.json").is_file():
        raise ConfigError(f"fine-tuning starts from a model folder; {init} has no model.json")
    net = load_model(init)
    if hasattr(net, "backbone"):
        net = net.backbone
    return net.train()


def run_finetune(
    cfg: Config,
    ft_dir: str | os.PathLike,
    tokens_dir: str | os.PathLike,
    init: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    print_weight_digest: bool = False,
) -> dict[str, float]:
    """Fine-tune the pretrained model in ``init`` with the method ``finetune.task``; returns the final
    metrics (rank 0)."""
    import lightning.pytorch as pl

    from lm.finetune import method
    from lm.text.shards import TokenIndex

    f = cfg.finetune
    pl.seed_everything(f.seed, workers=True, verbose=False)
    backbone = load_backbone(init)
    recipe = method(f.task).build(cfg, backbone, Path(ft_dir), Path(tokens_dir))
    return fit_and_save(
        cfg,
        "finetune",
        recipe.module,
        recipe.datamodule,
        Path(out_dir),
        tokens_per_batch=recipe.tokens_per_batch,
        describe=recipe.describe,
        meta={"task": f.task, **TokenIndex.load(tokens_dir).special_ids(), **recipe.meta},
        train_examples=recipe.train_examples,
        to_save=recipe.to_save,
        also_save=recipe.also_save,
        run_id=run_id,
        tracking_uri=tracking_uri,
        print_weight_digest=print_weight_digest,
    )


def _die_with_parent() -> None:
    """When the pipeline that launched us is killed (kill -9, out of memory), stop too, at once (not
    gracefully: a training stopped early must not publish its weights as finished; its checkpoints
    are whole, and the rerun resumes from them). Asked for by the launcher (LMFORGE_DIE_WITH_PARENT),
    and inherited by the ranks Lightning starts; Linux only."""
    if os.environ.get("LMFORGE_DIE_WITH_PARENT") != "1":
        return
    if die_with_parent(signal.SIGKILL) and parent_gone():  # the parent was already gone before we asked
        os._exit(1)


def _quiet_lightning_tips() -> None:
    """Lightning advertises cloud services on every start; our users read a log, not ads."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in str(record.msg)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm.training.child", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pretrain", "finetune"):
        sp = sub.add_parser(name, help=f"{name} (see module docstring)")
        sp.add_argument("--config", required=True, help="the stage's config.yaml")
        sp.add_argument("--data", required=True, help="token data dir (pretrain) or fine-tune data dir")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument(
            "--run-id", default=None, help="MLflow run to log metrics into (rank 0); none: no MLflow"
        )
        sp.add_argument(
            "--tracking-uri", default=None, help="MLflow tracking URI (default: tracking.uri, else MLFLOW_TRACKING_URI)"
        )
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
            sp.add_argument("--init", required=True, help="the pretrained model folder")
        else:
            sp.add_argument("--init", default=None, help="the base_model stage's folder (continued pretraining)")
    a = parser.parse_args(argv)
    _die_with_parent()
    from lm.tracking.metric_sender import SENDER_HTTP_SETTINGS

    for name, value in SENDER_HTTP_SETTINGS.items():  # this process's only MLflow caller is its MetricSender
        os.environ.setdefault(name, value)
    _quiet_lightning_tips()
    try:
        cfg = load_config(a.config, a.override)
        common = dict(run_id=a.run_id, tracking_uri=a.tracking_uri, print_weight_digest=a.print_weight_digest)
        if a.command == "pretrain":
            run_pretrain(cfg, a.data, a.out, init=a.init, **common)
        else:
            run_finetune(cfg, a.data, a.tokens, a.init, a.out, **common)
    except LmforgeError as e:
        # Every rank meets the same error (the divergence flag is all-reduced): say it once.
        if _is_rank_zero():
            print(f"lmforge: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
