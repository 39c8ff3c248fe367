"""Evaluation, by model kind, each number beside the trivial baseline it has to beat.

- decoder: next-token loss, perplexity and bits per byte of held-out text beside a unigram model;
- encoder: masked-token loss and accuracy on held-out text (a fixed masking of the validation
  windows; an encoder sees the tokens it is asked to predict otherwise) beside a unigram model;
- the fine-tuning method's own metrics on its test split (``lm/finetune/``) and, for sft, on the
  team's own evaluation set (``evaluate.data``) when the finetune_data stage wrote one.

Every metric is named ``eval/...`` (the team's evaluation set's ``eval_set/...``), apart from
training's ``val/...`` (which other windows and other weights produce); :func:`metric_directions`
says which way each is better.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from lm.config import Config, JudgeConfig
from lm.pipeline.stage import StageResult
from lm.tracking.figures import LOSS_CURVES, plot_loss_curves

LM_METRICS = {
    "decoder": {"eval/loss": "min", "eval/ppl": "min", "eval/bpb": "min"},
    "encoder": {"eval/mlm_loss": "min", "eval/mlm_accuracy": "max"},
}
EVAL_MASK_SEED = 0  # the masking of the encoder's evaluation windows: the same for every model
GENERATIONS = "generations.csv"  # a method's generated answers (sft): shown as a table in MLflow
EVAL_SET_GENERATIONS = "eval_set_generations.csv"  # the same on the team's own evaluation set (evaluate.data)


def metric_directions(cfg: Config) -> dict[str, str]:
    """The eval/ metrics the evaluate stage reports for this config, each with "max" or "min" (better)."""
    from lm.finetune import method

    return {**LM_METRICS[cfg.model.kind], **method(cfg.finetune.task).METRICS}


def _unigram_logp(train, vocab_size: int) -> np.ndarray:
    """log p(token) fitted on the training split, add-one smoothed over the vocabulary."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    step = 1 << 22
    for start in range(0, train.num_tokens, step):
        chunk = train.window(start, min(step, train.num_tokens - start))
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    return np.log((counts + 1) / (counts.sum() + vocab_size))


@torch.no_grad()
def language_model_metrics(
    model_dir: Path, tokens_dir: Path, max_batches: int, batch_size: int = 8
) -> dict[str, float]:
    """The pretrained model on the held-out split: decoder or encoder (see the module docstring)."""
    from lm.models.folder import load_model
    from lm.text.shards import TokenShards
    from lm.text.tokenizer import load_tokenizer
    from lm.training.pretrain_data import TokenWindows

    model = load_model(model_dir)
    seq_len = model.args.seq_len
    val, train = TokenShards(tokens_dir, "val"), TokenShards(tokens_dir, "train")
    windows = TokenWindows(val, seq_len, EVAL_MASK_SEED, random=False, kind=model.args.kind)
    n_windows = min(len(windows), max_batches * batch_size)
    if n_windows == 0:
        return {}
    unigram = _unigram_logp(train, val.vocab_size)
    tok = load_tokenizer(val.tokenizer_path) if model.args.kind == "decoder" else None
    nats = baseline_nats = correct = 0.0
    n_tokens = n_bytes = 0
    for b0 in range(0, n_windows, batch_size):
        pairs = [windows[i] for i in range(b0, min(b0 + batch_size, n_windows))]
        x = torch.stack([p[0] for p in pairs])  # (B, T)
        y = torch.stack([p[1] for p in pairs])  # (B, T), -100 where nothing is predicted
        logits, _ = model(x)
        scored = y != -100
        targets = y[scored]
        picked = logits[scored].float()  # (N, V)
        nats += float(torch.nn.functional.cross_entropy(picked, targets, reduction="sum"))
        correct += float((picked.argmax(-1) == targets).sum())
        baseline_nats += float(-unigram[targets.numpy()].sum())
        n_tokens += targets.numel()
        if tok is not None:
            for row in y.tolist():
                n_bytes += len(tok.decode(row, skip_special_tokens=False).encode("utf-8"))
    loss = nats / n_tokens
    if model.args.kind == "encoder":
        return {
            "eval/mlm_loss": loss,
            "eval/mlm_accuracy": correct / n_tokens,
            "eval/baseline_mlm_loss": baseline_nats / n_tokens,
            "eval/tokens": float(n_tokens),
        }
    return {
        "eval/loss": loss,
        "eval/ppl": math.exp(min(loss, 50.0)),
        "eval/bpb": nats / math.log(2) / max(n_bytes, 1),
        "eval/baseline_bpb": baseline_nats / math.log(2) / max(n_bytes, 1),
        "eval/tokens": float(n_tokens),
    }


def evaluate(
    cfg: Config, pretrain_dir: Path, finetune_dir: Path, tokens_dir: Path, ft_data_dir: Path, *, out_dir: Path
) -> StageResult:
    from lm.finetune import method
    from lm.text.shards import TokenIndex

    metrics = language_model_metrics(Path(pretrain_dir), Path(tokens_dir), cfg.evaluate.max_batches)
    metrics.update(
        method(cfg.finetune.task).evaluate(
            Path(finetune_dir),
            Path(ft_data_dir),
            Path(tokens_dir) / TokenIndex.load(tokens_dir).tokenizer,
            base_dir=Path(pretrain_dir),
            out_dir=out_dir,
            settings=cfg.evaluate,
        )
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    # What the numbers were measured on, hashed here once (this stage is cached), not by every deploy.
    digests = evaluation_set_digests(cfg, Path(ft_data_dir), Path(tokens_dir))
    (out_dir / EVAL_SETS).write_text(json.dumps(digests))
    plot_loss_curves(Path(pretrain_dir), Path(finetune_dir), out_dir / LOSS_CURVES)  # the two trainings at a glance
    artifacts = ["metrics.json", *sorted(p.name for p in out_dir.iterdir() if p.name != "metrics.json")]
    tables = [name for name in (GENERATIONS, EVAL_SET_GENERATIONS) if (out_dir / name).is_file()]
    # The held-out data as MLflow datasets, under the digests that say whether two runs' numbers compare.
    from lm.data.instruct import EVAL_SET, split_path
    from lm.data.labelled import SPLIT_FILES
    from lm.text.shards import INDEX

    held_out = [("heldout_tokens", Path(tokens_dir) / INDEX, digests["language_model"]),
                ("test", Path(ft_data_dir) / SPLIT_FILES["test"], digests["method"]),
                (EVAL_SET, split_path(ft_data_dir, EVAL_SET), digests["method"])]
    datasets = [{"name": name, "path": str(path.resolve()), "digest": digest, "source": "evaluate", "context": "evaluation"}
                for name, path, digest in held_out if path.is_file()]
    return StageResult(metrics=metrics, artifacts=artifacts, outputs={"metrics": "metrics.json"}, tables=tables,
                       datasets=datasets)


EVAL_SETS = "eval_sets.json"  # the evaluate stage's digests of its held-out data, by kind of metric


def evaluation_set_digests(cfg: Config, ft_data_dir: Path, tokens_dir: Path) -> dict[str, str]:
    """sha256 of the held-out files each kind of metric is measured on, with the ``evaluate``
    settings that pick from them: ``language_model`` (the validation token shards and their
    tokenizer) and ``method`` (the fine-tuning test split, its label names and the team's own
    evaluation set when there is one). Two numbers are comparable only under the same digest
    (issue 10)."""
    import hashlib

    from lm.data.instruct import EVAL_SET, split_path
    from lm.data.labelled import LABELS, SPLIT_FILES
    from lm.fileio import file_sha256
    from lm.text.shards import TokenIndex

    index = TokenIndex.load(tokens_dir)
    files = {
        "language_model": [Path(tokens_dir) / name for name in (*index.splits["val"]["files"], index.tokenizer)],
        "method": [p for p in (Path(ft_data_dir) / SPLIT_FILES["test"], Path(ft_data_dir) / LABELS,
                               split_path(ft_data_dir, EVAL_SET)) if p.is_file()],
    }
    # The judge picks nothing from the held-out data: its settings leave the digest as it was.
    settings = json.dumps(cfg.evaluate.model_dump(mode="json", exclude={"judge"}), sort_keys=True).encode()
    out = {}
    for kind, paths in files.items():
        h = hashlib.sha256(settings)
        for path in paths:
            h.update(f"{path.name}:{file_sha256(path)}\n".encode())
        out[kind] = h.hexdigest()
    return out


def digest_for_metric(cfg: Config, digests: dict[str, str]) -> str:
    """The digest of the data ``cfg.deploy.promote_metric`` is measured on."""
    return digests["language_model" if cfg.deploy.promote_metric in LM_METRICS[cfg.model.kind] else "method"]


def evaluation_set_digest(cfg: Config, ft_data_dir: Path, tokens_dir: Path) -> str:
    """sha256 of what ``cfg.deploy.promote_metric`` is measured on (see :func:`evaluation_set_digests`)."""
    return digest_for_metric(cfg, evaluation_set_digests(cfg, ft_data_dir, tokens_dir))


def rescore(cfg: Config, export_dir: Path, ft_data_dir: Path, tokens_dir: Path, *, out_dir: Path) -> dict[str, float]:
    """The evaluate stage's metrics for an exported model (a registered version, say) on this run's
    held-out data, with this run's ``evaluate`` settings.

    The model reads the held-out text with its own tokenizer. When that is not this run's (a
    retrain from scratch trains a new one), only the metrics measured on text or labels are
    returned: per-token numbers (loss, bits per byte of the validation windows, response loss)
    of two vocabularies do not compare. Raises :class:`DataError` when ``deploy.promote_metric``
    would not mean the same: another fine-tuning method or label set, or a per-token metric
    under another tokenizer."""
    from lm.data.labelled import LABELS
    from lm.errors import DataError
    from lm.finetune import method
    from lm.models.folder import read_model_json
    from lm.pipeline.export import LM_DIR
    from lm.text.shards import TokenIndex
    from lm.text.tokenizer import TOKENIZER

    export_dir, ft_data_dir, tokens_dir = Path(export_dir), Path(ft_data_dir), Path(tokens_dir)
    meta = read_model_json(export_dir)
    if meta.get("task") != cfg.finetune.task:
        raise DataError(f"it was tuned with finetune.task={meta.get('task')}, this run with {cfg.finetune.task}")
    if (ft_data_dir / LABELS).is_file() and meta.get("labels") != json.loads((ft_data_dir / LABELS).read_text()):
        raise DataError("its label set differs from this run's")
    tuned = method(cfg.finetune.task)
    own = export_dir / TOKENIZER
    same_tokenizer = own.read_bytes() == (tokens_dir / TokenIndex.load(tokens_dir).tokenizer).read_bytes()
    # A method that does not say which of its numbers are per token is taken to mean all of them.
    token_metrics = set(getattr(tuned, "TOKEN_METRICS", tuned.METRICS))
    per_token = set(LM_METRICS[cfg.model.kind]) | token_metrics
    if not same_tokenizer and cfg.deploy.promote_metric in per_token:
        raise DataError(
            f"its tokenizer differs from this run's, and deploy.promote_metric={cfg.deploy.promote_metric} is "
            f"measured per token, so the two numbers do not compare; choose a metric measured on text or labels "
            f"({', '.join(sorted(set(tuned.METRICS) - per_token))}) to let the pipeline decide"
        )
    # The validation windows are this run's token ids: only a model that reads those ids is scored on them.
    metrics = language_model_metrics(export_dir / LM_DIR, tokens_dir, cfg.evaluate.max_batches) if same_tokenizer else {}
    # No judge: its win rate is over each model's own start, not a number to rank two models by.
    settings = cfg.evaluate.model_copy(update={"judge": JudgeConfig()})
    scores = tuned.evaluate(
        export_dir, ft_data_dir, own, base_dir=export_dir / LM_DIR, out_dir=Path(out_dir), settings=settings
    )
    metrics.update({k: v for k, v in scores.items() if same_tokenizer or k not in token_metrics})
    return metrics
