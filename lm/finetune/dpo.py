"""Preference tuning (``finetune.task=dpo``) of the pretrained decoder on (prompt, chosen, rejected)
pairs, in full or through LoRA adapters (``finetune.lora.enabled``, :mod:`lm.finetune.lora`).

Objective: DPO (Rafailov et al. 2023, "Direct Preference Optimization"), the ``sigmoid`` loss
``-log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))``,
optionally conservative (Mitchell 2023: ``finetune.dpo.label_smoothing`` of the labels taken as
flipped), or IPO (Azar et al. 2023), ``((h_w - h_l) - 1 / (2 beta))^2`` on the log-ratios averaged
per reply token (as TRL computes it; IPO's authors report results in this form). ``log pi(y|x)`` is
the sum of the log-probabilities of the reply's tokens (its assistant turns after the prompt,
rendered with the tokenizer's chat template) given everything before them.

The reference ``ref`` is the starting model. Its log-probabilities of every training and validation
pair are computed once, before training, by the network about to be trained (the DataModule's
``prepare_data``: local rank 0, before a checkpoint is restored), and stored in the finetune
stage's folder (:data:`REFERENCE`, keyed by the starting weights, the chat template, the context and
the data), so no second network is held while training; a resumed run reads them back.

Metrics: ``rewards/chosen`` and ``rewards/rejected`` (the implicit reward ``beta * (log pi - log
ref)`` of each reply), ``rewards/margins`` (their difference) and ``rewards/accuracy`` (the share of
pairs whose chosen reply has the higher reward; a tie counts as half), per step (``train/``), at
validation (``val/``) and on the test split (``eval/``). The starting model's reward is 0 for every
reply, so its accuracy is 0.5 by construction (all ties): ``eval/base_rewards/accuracy``. Beside
it, ``eval/logp_accuracy`` and ``eval/base_logp_accuracy`` say how often the tuned and the starting
model give the chosen reply the higher probability outright (no reference).

A tuned model is a chat model: it is exported, registered and served as instruction tuning's
(:func:`lm.finetune.sft.export`, :class:`lm.finetune.sft.Predictor`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lm.config import Config, DPOConfig, EvaluateConfig
from lm.data.labelled import SPLIT_FILES
from lm.data.preference import read_preference_split
from lm.errors import DataError
from lm.finetune import Recipe
from lm.finetune.decoder_tuning import data_name, lora_saving, lora_words, tunable_decoder
from lm.finetune.sft import Predictor, export  # noqa: F401  (a DPO-tuned model is exported and predicts as sft's)
from lm.finetune.splits import SplitDataModule
from lm.models.folder import load_model
from lm.models.transformer import count_params
from lm.text.chat import ChatFormat, Message
from lm.training.modules import OptimisedModule

METRICS = {"eval/rewards/accuracy": "max", "eval/rewards/margins": "max"}
# Sums (or, IPO, means) of token log-probabilities: only comparable between models that share a tokenizer.
TOKEN_METRICS = frozenset(
    {"eval/rewards/margins", "eval/rewards/chosen", "eval/rewards/rejected", "eval/preference_loss",
     "eval/base_preference_loss"}
)
REFERENCE = "reference_logps.safetensors"  # in the finetune stage's folder: {split: (N, 2) chosen, rejected}
PREFERENCES = "preferences.csv"  # evaluation: the test pairs' rewards, side by side
SHOWN_PAIRS = 200


# ---- examples -----------------------------------------------------------------------------------


@dataclass
class Pairs:
    """One split encoded: (chosen ids (T,), chosen targets (T,), rejected ids (T',), rejected targets
    (T',)) per pair, T, T' <= seq_len; targets are the reply's tokens, -100 elsewhere."""

    items: list[tuple[torch.Tensor, ...]]
    truncated: int  # pairs with a conversation cut at seq_len (its start kept)
    skipped: int  # pairs whose prompt alone fills the context: a reply without a token left
    kept: list[int]  # the position of each item's pair in the input


def encode_pairs(fmt: ChatFormat, pairs: list[tuple[list[Message], ...]], seq_len: int) -> Pairs:
    """(prompt, chosen, rejected) -> next-token examples whose targets are the reply's assistant tokens."""
    prompts = fmt.encode_many([prompt for prompt, _, _ in pairs], add_generation_prompt=True)
    conversations = fmt.encode_many([prompt + reply for prompt, *replies in pairs for reply in replies])
    items, truncated, skipped, kept = [], 0, 0, []
    for k, (prompt_ids, _) in enumerate(prompts):
        sides, cut = [], False
        for ids, assistant in conversations[2 * k : 2 * k + 2]:
            if len(ids) > seq_len + 1:
                ids, assistant, cut = ids[: seq_len + 1], assistant[: seq_len + 1], True
            x = torch.tensor(ids, dtype=torch.long)
            # Target t is token t + 1; the prompt's own assistant turns (earlier in a dialogue) are context.
            reply = torch.tensor([a and i >= len(prompt_ids) for i, a in enumerate(assistant)][1:], dtype=torch.bool)
            sides += [x[:-1], torch.where(reply, x[1:], -100)]
        if not ((sides[1] != -100).any() and (sides[3] != -100).any()):
            skipped += 1
            continue
        truncated += cut
        items.append(tuple(sides))
        kept.append(k)
    return Pairs(items, truncated, skipped, kept)


def collate(pad_id: int) -> Callable[[list[tuple[torch.Tensor, ...]]], tuple[torch.Tensor, ...]]:
    """B pairs -> ids (B, 2, T) right-padded with pad_id and targets (B, 2, T) padded with -100 (each
    pair's chosen conversation, then its rejected one); with the stored reference, its log-probabilities
    (B, 2). Pair-major, so a batch's first dimension counts pairs (what the resumable sampler counts)."""

    def fn(batch: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        T = max(max(len(b[0]), len(b[2])) for b in batch)
        ids = torch.full((len(batch), 2, T), pad_id, dtype=torch.long)
        targets = torch.full((len(batch), 2, T), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            for side in (0, 1):
                x, y = b[2 * side], b[2 * side + 1]
                ids[i, side, : len(x)], targets[i, side, : len(y)] = x, y
        if len(batch[0]) == 4:
            return ids, targets
        return ids, targets, torch.stack([torch.stack(b[4:6]) for b in batch])

    return fn


def chosen_then_rejected(pairs: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) pair-major -> (2B, ...): the B chosen, then the B rejected (one forward for both)."""
    return pairs.transpose(0, 1).flatten(0, 1)


# ---- the objective ------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, T, V), targets (N, T) -> (the summed log-probability of each sequence's target
    tokens (N,), their number (N,))."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast: scored in float32
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(targets.shape).sum(-1), (targets != -100).sum(-1)


def preference_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    counts: torch.Tensor,
    *,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """policy, reference: log-probabilities (2B,) of the B chosen then the B rejected replies;
    counts (2B,): their tokens. -> (loss per pair (B,), chosen rewards (B,), rejected rewards (B,))."""
    chosen, rejected = (policy - reference).chunk(2)  # log-ratios, (B,) each
    if loss == "ipo":  # Azar et al. 2023, eq. 17, on per-token means
        n_chosen, n_rejected = counts.chunk(2)
        delta = chosen / n_chosen.clamp(min=1) - rejected / n_rejected.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:  # Rafailov et al. 2023, eq. 7; conservative with label smoothing (Mitchell 2023)
        delta = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen reply scores higher, 0 where lower, 1/2 on a tie (the starting model's rewards)."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def reward_metrics(prefix: str, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}/rewards/chosen": chosen.mean(),
        f"{prefix}/rewards/rejected": rejected.mean(),
        f"{prefix}/rewards/margins": (chosen - rejected).mean(),
        f"{prefix}/rewards/accuracy": wins(chosen, rejected).mean(),
    }


# ---- the stored reference -----------------------------------------------------------------------


@torch.no_grad()
def pair_logps(
    net: nn.Module, items: list[tuple[torch.Tensor, ...]], pad_id: int, batch_size: int = 16,
    device: torch.device | str = "cpu", context: Callable = nullcontext,
) -> torch.Tensor:
    """(N, 2): the summed log-probabilities of each pair's chosen and rejected reply under ``net``
    (in eval mode: no dropout), ``context`` around each forward (the run's autocast)."""
    was_training = net.training
    net.eval()
    pad, out = collate(pad_id), []
    for i in range(0, len(items), batch_size):
        ids, targets = (chosen_then_rejected(t) for t in pad([item[:4] for item in items[i : i + batch_size]]))
        with context():
            logits = net(ids.to(device))[0]
        logps, _ = sequence_logps(logits, targets.to(device))
        out.append(torch.stack(logps.chunk(2), dim=1).cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def reference_key(net: nn.Module, fmt: ChatFormat, data_dir: Path, seq_len: int) -> str:
    """What the stored reference log-probabilities were computed from: the starting weights, the
    chat template, the context and the train/val splits."""
    h = hashlib.sha256(json.dumps([fmt.config, seq_len], sort_keys=True, default=str).encode())
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    for split in ("train", "val"):
        h.update((Path(data_dir) / SPLIT_FILES[split]).read_bytes())
    return h.hexdigest()


def stored_reference(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The reference log-probabilities stored at ``path`` for ``key``; None when there are none for it."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


class PreferenceDataModule(SplitDataModule):
    """``train/val.parquet`` pairs -> (ids (B,2,T), targets (B,2,T), reference log-probabilities (B,2))."""

    def __init__(
        self, data_dir: Path, fmt: ChatFormat, seq_len: int, batch_size: int, seed: int, pad_id: int, key: str
    ):
        super().__init__(data_dir, batch_size, seed)
        self.fmt, self.seq_len, self.pad_id, self.key = fmt, seq_len, pad_id, key
        self.collate_fn = collate(pad_id)
        self.counts: Counter = Counter()
        self._pairs: dict[str, Pairs] = {}

    def pairs(self, name: str) -> list[tuple[torch.Tensor, ...]]:
        """The encoded pairs of split ``name``, without the reference."""
        if name not in self._pairs:
            encoded = encode_pairs(self.fmt, read_preference_split(self.data_dir, name), self.seq_len)
            if not encoded.items:
                raise DataError(
                    f"{self.data_dir / SPLIT_FILES[name]}: no pair has a reply token within the model's "
                    f"{self.seq_len}-token context: shorten the prompts or use a longer model.seq_len"
                )
            self.counts[f"{name}_truncated"], self.counts[f"{name}_skipped"] = encoded.truncated, encoded.skipped
            self._pairs[name] = encoded
        return self._pairs[name].items

    def reference_path(self) -> Path:
        return Path(self.trainer.default_root_dir) / REFERENCE  # the stage's folder (lm.training.child)

    def prepare_data(self) -> None:
        # Lightning calls this on local rank 0, before it restores a checkpoint (the network holds the
        # starting weights, also on resume) and before the other ranks read the file (a barrier).
        from safetensors.torch import save_file

        from lm.fileio import atomic_write

        path = self.reference_path()
        if stored_reference(path, self.key) is not None:
            return
        net, strategy = self.trainer.lightning_module.net, self.trainer.strategy
        device = strategy.root_device
        net.to(device)  # where training will run it (the strategy's setup moves it there next anyway)
        logps = {
            name: pair_logps(net, self.pairs(name), self.pad_id, self.batch_size, device,
                             strategy.precision_plugin.forward_context).contiguous()
            for name in ("train", "val")
        }
        atomic_write(path, lambda tmp: save_file(logps, str(tmp), metadata={"key": self.key}))

    def encode(self, name: str) -> list[tuple[torch.Tensor, ...]]:
        stored = stored_reference(self.reference_path(), self.key)
        if stored is None:
            raise DataError(f"{self.reference_path()} holds no reference log-probabilities for this run's model and data")
        return [(*item, ref[0], ref[1]) for item, ref in zip(self.pairs(name), stored[name], strict=True)]


# ---- the LightningModule ------------------------------------------------------------------------


class DPOModule(OptimisedModule):
    """Preference tuning of a Decoder against stored reference log-probabilities: batches are (ids
    (B,2,T), targets (B,2,T), reference (B,2)), each pair's chosen then rejected. ``val/loss`` is the preference loss of the validation
    pairs, beside their ``val/rewards/*`` (pair-weighted over all ranks)."""

    _val_sum: torch.Tensor | None = None

    def __init__(self, net: nn.Module, train, settings: DPOConfig):
        super().__init__(net, train)
        self.objective = {"loss": settings.loss, "beta": settings.beta, "label_smoothing": settings.label_smoothing}

    def pair_losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, targets, reference = (chosen_then_rejected(t) for t in batch)  # (2B, T), (2B, T), (2B,)
        logps, counts = sequence_logps(self.net(ids)[0], targets)
        return preference_loss(logps, reference, counts, **self.objective)

    def batch_loss(self, batch) -> torch.Tensor:
        losses, chosen, rejected = self.pair_losses(batch)
        if self._trainer is not None and self._is_log_step():  # this rank's micro-batch, as train/loss
            self.record(reward_metrics("train", chosen, rejected), self.global_step + 1)
        return losses.mean()

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(5, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx: int) -> None:
        losses, chosen, rejected = self.pair_losses(batch)
        n = torch.tensor(float(len(losses)), device=self.device)
        parts = [losses.sum(), chosen.sum(), rejected.sum(), wins(chosen, rejected).sum(), n]
        self._val_sum += torch.stack([p.double() for p in parts])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        loss, chosen, rejected, right, n = (float(t) for t in total)
        n = max(n, 1.0)
        self.last_val = {
            "val/loss": loss / n,
            "val/rewards/chosen": chosen / n,
            "val/rewards/rejected": rejected / n,
            "val/rewards/margins": (chosen - rejected) / n,
            "val/rewards/accuracy": right / n,
        }
        self.last_val_step = self.global_step
        for key, value in self.last_val.items():  # already reduced over ranks; sync_dist keeps Lightning quiet
            self.log(key, value, prog_bar=key in ("val/loss", "val/rewards/accuracy"), sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            v = self.last_val
            print(f"lmforge: step {self.global_step} val/loss {v['val/loss']:.4f} val/rewards/accuracy "
                  f"{v['val/rewards/accuracy']:.3f} val/rewards/margins {v['val/rewards/margins']:.4f}", flush=True)


def build(cfg: Config, backbone: nn.Module, data_dir: Path, tokens_dir: Path) -> Recipe:
    from lm.finetune.lora import trainable_params
    from lm.text.shards import TokenIndex

    f, args = cfg.finetune, backbone.args
    net = tunable_decoder(cfg, backbone, "dpo")
    index, fmt = TokenIndex.load(tokens_dir), ChatFormat.load(tokens_dir)
    key = reference_key(backbone, fmt, data_dir, args.seq_len)  # the starting weights: the reference
    dm = PreferenceDataModule(data_dir, fmt, args.seq_len, f.batch_size, f.seed, index.pad_id, key)
    train = dm.pairs("train")
    dm.pairs("val")
    for split in ("train", "val"):
        if dm.counts[f"{split}_truncated"] or dm.counts[f"{split}_skipped"]:
            print(f"lmforge: dpo: {split} split: {dm.counts[f'{split}_truncated']} pairs cut at model.seq_len="
                  f"{args.seq_len} (their start kept), {dm.counts[f'{split}_skipped']} skipped (the prompt alone "
                  "fills the context)", flush=True)
    d = f.dpo
    objective = (f"{'IPO' if d.loss == 'ipo' else 'DPO'} (loss={d.loss}, beta={d.beta}"
                 + (f", label smoothing {d.label_smoothing}" if d.label_smoothing else "") + ") against the starting model")
    what = lora_words(f)
    tokens = round(sum(len(item[0]) + len(item[2]) for item in train) / len(train))  # a pair's two conversations
    return Recipe(
        module=DPOModule(net, f, d),
        datamodule=dm,
        tokens_per_batch=f.batch_size * tokens,
        describe=f"preference tuning, {objective}, {what}{trainable_params(net) / 1e6:.2f}M of "
        f"{count_params(net) / 1e6:.2f}M params trained, {len(train)} train pairs",
        meta={
            "tokenizer_config": fmt.config,
            "system_prompt": d.system_prompt,
            "tuned_as": "preference-tuned",
            "truncated_examples": dm.counts["train_truncated"],
            "skipped_examples": dm.counts["train_skipped"],
            "finetune": {
                "data": data_name(f.data),
                "max_steps": f.max_steps,
                "lr": f.lr,
                "lora": f.lora.model_dump() if f.lora.enabled else None,
                "objective": objective,
                "dpo": {"loss": d.loss, "beta": d.beta, "label_smoothing": d.label_smoothing},
            },
        },
        train_examples=len(train),
        **lora_saving(f),
    )


# ---- evaluation ---------------------------------------------------------------------------------


def _last_user_text(messages: list[Message]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def evaluate(
    model_dir: Path,
    data_dir: Path,
    tokenizer_path: Path,
    *,
    base_dir: Path | None = None,
    out_dir: Path,
    settings: EvaluateConfig | None = None,
) -> dict[str, float]:
    """Preference accuracy, rewards and loss of the tuned model on the test pairs, the starting model
    (``base_dir``, the reference) beside it; writes preferences.csv (the first pairs' rewards)."""
    if base_dir is None:
        raise DataError("finetune.task=dpo is evaluated against the model it started from: give base_dir")
    predictor = Predictor(model_dir, tokenizer_path=tokenizer_path)  # the tuned model and its chat format
    model, fmt = predictor.model, predictor.fmt
    objective = model.meta.get("finetune", {}).get("dpo") or {}
    pad_id = int(model.meta["pad_id"])
    test = read_preference_split(data_dir, "test")
    pairs = encode_pairs(fmt, test, model.args.seq_len)
    if not pairs.items:
        raise DataError(f"{Path(data_dir) / SPLIT_FILES['test']}: no pair has a reply token within the context")
    policy = pair_logps(model, pairs.items, pad_id)
    del predictor, model  # one network at a time
    reference = pair_logps(load_model(base_dir), pairs.items, pad_id)
    counts = torch.tensor([int((item[k] != -100).sum()) for k in (1, 3) for item in pairs.items])

    def scored(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return preference_loss(logps.T.flatten(), reference.T.flatten(), counts, **objective)

    losses, chosen, rejected = scored(policy)
    base_losses, base_chosen, base_rejected = scored(reference)  # rewards 0: the reference against itself
    metrics = {k: float(v) for k, v in reward_metrics("eval", chosen, rejected).items()}
    metrics.update({
        "eval/base_rewards/accuracy": float(wins(base_chosen, base_rejected).mean()),
        "eval/preference_loss": float(losses.mean()),
        "eval/base_preference_loss": float(base_losses.mean()),
        "eval/logp_accuracy": float(wins(policy[:, 0], policy[:, 1]).mean()),
        "eval/base_logp_accuracy": float(wins(reference[:, 0], reference[:, 1]).mean()),
        "eval/test_pairs": float(len(pairs.items)),
        "eval/truncated_test_pairs": float(pairs.truncated),
        "eval/skipped_test_pairs": float(pairs.skipped),
    })
    shown = [test[k] for k in pairs.kept[:SHOWN_PAIRS]]
    n = len(shown)
    pd.DataFrame({
        "prompt": [_last_user_text(p) for p, _, _ in shown],
        "chosen": [c[-1]["content"] for _, c, _ in shown],
        "rejected": [r[-1]["content"] for _, _, r in shown],
        "chosen_reward": chosen[:n].round(decimals=4).tolist(),
        "rejected_reward": rejected[:n].round(decimals=4).tolist(),
        "right": wins(chosen[:n], rejected[:n]).tolist(),
    }).to_csv(Path(out_dir) / PREFERENCES, index=False)
    return metrics
