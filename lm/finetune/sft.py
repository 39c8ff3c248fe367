"""Instruction tuning (supervised fine-tuning, ``finetune.task=sft``) of the pretrained decoder,
in full or through LoRA adapters (``finetune.lora.enabled``, :mod:`lm.finetune.lora`).

Data: ``train/val/test.parquet`` of chat conversations (:mod:`lm.data.instruct`). A conversation
is rendered with the tokenizer's chat template and encoded with, per token, whether it belongs to
an assistant turn (:class:`lm.text.chat.ChatFormat`); only those tokens are learned and scored
(targets -100 elsewhere). A conversation longer than the model's context keeps its start and is
counted as truncated; one whose prompt alone fills the context teaches nothing and is skipped and
counted. ``finetune.sft.packing`` puts several conversations in one window, each attending only to
itself (a block-diagonal causal mask: the decoder's ``document_ids``).

Metrics (test split, ``eval/``; the team's own evaluation set when the finetune_data stage wrote
one, ``eval_set/``): the response loss of the tuned and of the pretrained model, and for the
first ``evaluate.generate_prompts`` prompts, answered greedily, chrF (Popović 2015), ROUGE-L
(Lin 2004) and exact match beside a nearest-neighbour responder that answers with the training
response of the most similar training prompt (TF-IDF, cosine); with ``evaluate.judge.url``, a
judged win rate over the pretrained model's answers (:mod:`lm.finetune.judge`).
``generations.csv`` (``eval_set_generations.csv``) shows them side by side.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lm.config import Config, EvaluateConfig
from lm.data.instruct import EVAL_SET, read_split, split_path
from lm.data.labelled import SPLIT_FILES
from lm.errors import DataError
from lm.finetune import Recipe
from lm.finetune.decoder_tuning import data_name, lora_saving, lora_words, tunable_decoder
from lm.finetune.splits import SplitDataModule
from lm.models.folder import load_model
from lm.models.transformer import count_params
from lm.pipeline.evaluate import EVAL_SET_GENERATIONS, GENERATIONS
from lm.text.chat import TOKENIZER_CONFIG, ChatFormat, Message, turn_ends
from lm.training.modules import OptimisedModule

METRICS = {"eval/response_loss": "min", "eval/chrf": "max", "eval/exact_match": "max", "eval/rouge_l": "max"}
# Measured per token, so only comparable between models that share a tokenizer (the rest are on text).
TOKEN_METRICS = frozenset({f"{prefix}/{name}" for prefix in ("eval", EVAL_SET)
                           for name in ("response_loss", "response_ppl", "base_response_loss")})
HF_DIR = "hf"
ADAPTER_DIR = "adapter"  # after LoRA: the adapter in peft's format, on the model it was tuned from
DEFAULT_MAX_NEW_TOKENS = 64  # a prediction that does not say how long it may be


# ---- examples -----------------------------------------------------------------------------------


@dataclass
class Examples:
    """One split encoded for training: (inputs (T,), targets (T,)) per conversation, T <= seq_len."""

    items: list[tuple[torch.Tensor, torch.Tensor]]
    truncated: int  # conversations cut at seq_len (their start kept)
    skipped: int  # conversations whose prompt alone filled the context: no assistant token left


def encode_examples(
    fmt: ChatFormat, conversations: list[list[Message]], seq_len: int, train_on: str = "assistant"
) -> Examples:
    """Conversations -> next-token examples whose targets are the learned tokens only (-100
    elsewhere): by default the assistant tokens (``finetune.sft.train_on``)."""
    items, truncated, skipped = [], 0, 0
    for ids, assistant in fmt.encode_many(conversations, learn=train_on):
        if len(ids) > seq_len + 1:
            ids, assistant = ids[: seq_len + 1], assistant[: seq_len + 1]
            truncated += 1
        x = torch.tensor(ids, dtype=torch.long)
        learned = torch.tensor(assistant[1:], dtype=torch.bool)  # target t is token t + 1
        if not learned.any():
            skipped += 1
            continue
        items.append((x[:-1], torch.where(learned, x[1:], -100)))
    return Examples(items, truncated, skipped)


def pack(items: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int, pad_id: int) -> list[tuple[torch.Tensor, ...]]:
    """Examples laid one after another into windows of seq_len (next fit, in their order; an example
    is never split) -> (inputs (T,), targets (T,), document (T,)): document k >= 1 for the k-th
    example of the window, 0 for padding."""
    windows, current = [], []

    def close() -> None:
        ids = torch.full((seq_len,), pad_id, dtype=torch.long)
        targets = torch.full((seq_len,), -100, dtype=torch.long)
        doc = torch.zeros(seq_len, dtype=torch.long)
        pos = 0
        for k, (x, y) in enumerate(current, 1):
            ids[pos : pos + len(x)], targets[pos : pos + len(x)], doc[pos : pos + len(x)] = x, y, k
            pos += len(x)
        windows.append((ids, targets, doc))
        current.clear()

    used = 0
    for x, y in items:
        if current and used + len(x) > seq_len:
            close()
            used = 0
        current.append((x, y))
        used += len(x)
    if current:
        close()
    return windows


def collate(pad_id: int):
    """Unpacked examples -> ids (B, T) right-padded with pad_id, targets (B, T) padded with -100
    (T: the batch's longest); packed windows are stacked as they are."""

    def fn(batch: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        if len(batch[0]) == 3:
            return tuple(torch.stack(parts) for parts in zip(*batch, strict=True))
        T = max(len(x) for x, _ in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        targets = torch.full((len(batch), T), -100, dtype=torch.long)
        for b, (x, y) in enumerate(batch):
            ids[b, : len(x)], targets[b, : len(y)] = x, y
        return ids, targets

    return fn


class InstructionDataModule(SplitDataModule):
    """``train/val.parquet`` conversations -> (ids (B,T), targets (B,T)) or, packed, (ids, targets,
    document (B,T)); the targets are the tokens ``train_on`` says (``finetune.sft.train_on``)."""

    def __init__(
        self, data_dir: Path, fmt: ChatFormat, seq_len: int, batch_size: int, seed: int, pad_id: int, packing: bool,
        train_on: str = "assistant",
    ):
        super().__init__(data_dir, batch_size, seed)
        self.fmt, self.seq_len, self.pad_id, self.packing = fmt, seq_len, pad_id, packing
        self.train_on = train_on
        self.collate_fn = collate(pad_id)
        self.counts: Counter = Counter()

    def encode(self, name: str) -> list[tuple[torch.Tensor, ...]]:
        examples = encode_examples(self.fmt, read_split(self.data_dir, name), self.seq_len, self.train_on)
        if not examples.items:
            raise DataError(
                f"{self.data_dir / SPLIT_FILES[name]}: no conversation has an assistant token within the model's "
                f"{self.seq_len}-token context: shorten the prompts or use a longer model.seq_len"
            )
        self.counts[f"{name}_truncated"], self.counts[f"{name}_skipped"] = examples.truncated, examples.skipped
        return pack(examples.items, self.seq_len, self.pad_id) if self.packing else examples.items


# ---- the network's forward ----------------------------------------------------------------------


def batch_logits(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if len(batch) == 3:  # packed: (ids, targets, document ids)
        return net(batch[0], document_ids=batch[2])[0]
    return net(batch[0])[0]  # right padding needs no mask in a causal model


def summed_nats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy over the learned tokens, their number)."""
    nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nats, (targets != -100).sum()


class SFTModule(OptimisedModule):
    """Instruction tuning of a Decoder: mean cross-entropy over the assistant tokens of a batch.
    ``val/loss`` is the response loss of the validation split (token-weighted over all ranks)."""

    _val_sum: torch.Tensor | None = None

    def batch_loss(self, batch) -> torch.Tensor:
        nats, n = summed_nats(batch_logits(self.net, batch), batch[1])
        return nats / n.clamp(min=1)

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(2, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx: int) -> None:
        nats, n = summed_nats(batch_logits(self.net, batch), batch[1])
        self._val_sum += torch.stack([nats.double(), n.double()])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        loss = float(total[0] / total[1].clamp(min=1))
        ppl = math.exp(min(loss, 50.0))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", ppl, sync_dist=True)
        self.last_val, self.last_val_step = {"val/loss": loss, "val/ppl": ppl}, self.global_step
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            print(f"lmforge: step {self.global_step} val/loss {loss:.4f} (response tokens)", flush=True)


def build(cfg: Config, backbone: nn.Module, data_dir: Path, tokens_dir: Path) -> Recipe:
    from lm.finetune.lora import trainable_params
    from lm.text.shards import TokenIndex

    f, args = cfg.finetune, backbone.args
    net = tunable_decoder(cfg, backbone, "sft")
    index = TokenIndex.load(tokens_dir)
    fmt = ChatFormat.load(tokens_dir)
    dm = InstructionDataModule(data_dir, fmt, args.seq_len, f.batch_size, f.seed, index.pad_id, f.sft.packing,
                               f.sft.train_on)
    train = dm.split("train")
    dm.split("val")
    tokens = args.seq_len if f.sft.packing else round(sum(len(x) for x, *_ in train) / len(train))
    for split in ("train", "val"):
        if dm.counts[f"{split}_truncated"] or dm.counts[f"{split}_skipped"]:
            print(
                f"lmforge: sft: {split} split: {dm.counts[f'{split}_truncated']} conversations cut at "
                f"model.seq_len={args.seq_len} (their start kept), {dm.counts[f'{split}_skipped']} skipped "
                "(the prompt alone fills the context)",
                flush=True,
            )
    what = lora_words(f)
    return Recipe(
        module=SFTModule(net, f),
        datamodule=dm,
        tokens_per_batch=f.batch_size * tokens,
        describe=f"instruction tuning, {what}{trainable_params(net) / 1e6:.2f}M of {count_params(net) / 1e6:.2f}M "
        f"params trained, {len(train)} train {'windows' if f.sft.packing else 'conversations'}",
        meta={
            "tokenizer_config": fmt.config,
            "system_prompt": f.sft.system_prompt,
            "truncated_examples": dm.counts["train_truncated"],
            "skipped_examples": dm.counts["train_skipped"],
            "finetune": {
                "data": data_name(f.data),
                "max_steps": f.max_steps,
                "lr": f.lr,
                "packing": f.sft.packing,
                "lora": f.lora.model_dump() if f.lora.enabled else None,
            },
        },
        train_examples=len(train),
        **lora_saving(f),
    )


# ---- evaluation ---------------------------------------------------------------------------------


def char_ngrams(text: str, n: int) -> Counter:
    chars = "".join(text.split())  # chrF ignores whitespace
    return Counter(chars[i : i + n] for i in range(len(chars) - n + 1))


def chrf_statistics(hypothesis: str, reference: str, order: int = 6) -> list[tuple[int, int, int]]:
    """Per n-gram order 1..order: (matching, hypothesis, reference) character n-gram counts."""
    out = []
    for n in range(1, order + 1):
        hyp, ref = char_ngrams(hypothesis, n), char_ngrams(reference, n)
        out.append((sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values())))
    return out


def chrf(hypotheses: list[str], references: list[str], order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation"), 0..100:
    character n-gram precision and recall, each averaged over the orders 1..``order`` that the
    references have, combined into an F-score that weighs recall ``beta`` times as much. Counts are
    summed over the corpus before dividing (a sentence's score: a corpus of one)."""
    totals = [[0, 0, 0] for _ in range(order)]
    for hyp, ref in zip(hypotheses, references, strict=True):
        for total, stats in zip(totals, chrf_statistics(hyp, ref, order), strict=True):
            for i in range(3):
                total[i] += stats[i]
    orders = [(m, h, r) for m, h, r in totals if r > 0]
    if not orders:
        return 100.0 if all(not "".join(h.split()) for h in hypotheses) else 0.0
    precision = sum(m / h if h else 0.0 for m, h, _ in orders) / len(orders)
    recall = sum(m / r for m, _, r in orders) / len(orders)
    if precision + recall == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


# Words for ROUGE-L: runs of letters and digits, lower-cased, as rouge_score's own tokenizer takes
# them from ASCII text, but in every script (its own drops every other character); Chinese and
# Japanese write no spaces between words, so each of their characters is a word.
NO_SPACE_SCRIPTS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
WORDS = re.compile(f"[{NO_SPACE_SCRIPTS}]|[^\\W_{NO_SPACE_SCRIPTS}]+")


class RougeWords:
    """rouge_score's tokenizer interface (``tokenize(text) -> tokens``) over :data:`WORDS`."""

    def tokenize(self, text: str) -> list[str]:
        return WORDS.findall(text.lower())


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """ROUGE-L (Lin 2004, "ROUGE: a package for automatic evaluation of summaries"), 0..100: the
    F-measure of the longest common subsequence of words, by Google's rouge_score (no stemming),
    averaged over the pairs, as instruction-tuning papers report it."""
    # Here, not at the top: rouge_score is not among the registered model's requirements.
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=RougeWords())
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references, strict=True)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def normalised(text: str) -> str:
    """For exact match: case and runs of whitespace do not count."""
    return " ".join(text.lower().split())


def prompt_text(messages: list[Message]) -> str:
    """What the user said in a conversation's prompt (what the baseline compares)."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def nearest_neighbour_responses(train: list[list[Message]], prompts: list[list[Message]]) -> list[str]:
    """For each prompt, the final response of the training conversation whose user text is most
    similar (TF-IDF vectors fitted on the training prompts, cosine similarity; ties: the first)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True)
    known = vectorizer.fit_transform([prompt_text(c[:-1]) for c in train])  # rows L2-normalised
    queries = vectorizer.transform([prompt_text(p) for p in prompts])
    nearest = (queries @ known.T).toarray().argmax(axis=1)
    return [train[i][-1]["content"] for i in nearest]


@torch.no_grad()
def response_loss(model: nn.Module, examples: Examples, pad_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy over the assistant tokens of encoded examples."""
    nats, n = 0.0, 0
    pad = collate(pad_id)
    for i in range(0, len(examples.items), batch_size):
        batch = pad(examples.items[i : i + batch_size])
        s, k = summed_nats(model(batch[0])[0], batch[1])
        nats, n = nats + float(s), n + int(k)
    return nats / max(n, 1)


# The test split keeps the names its counts had before the team's evaluation set was scored beside it.
TEST_NAMES = {"examples": "test_examples", "truncated_examples": "truncated_test_examples"}


@dataclass
class Responders:
    """Who answers the held-out prompts: the tuned model, the model before tuning (``base``: None
    when there is none to compare with) and the training split (the nearest-neighbour baseline's)."""

    tuned: Predictor
    base: Predictor | None
    train: list[list[Message]]
    pad_id: int


def text_scores(answers: list[str], references: list[str]) -> dict[str, float]:
    """chrF, ROUGE-L and exact match of answers against their references."""
    exact = sum(normalised(a) == normalised(r) for a, r in zip(answers, references, strict=True))
    return {"chrf": chrf(answers, references), "rouge_l": rouge_l(answers, references),
            "exact_match": exact / max(len(answers), 1)}


def judged(who: Responders, prompts: list[list[Message]], references: list[str], responses: list[str],
           settings: EvaluateConfig) -> tuple[dict[str, float], list[str], list[str]]:
    """The judge's counts for the first ``evaluate.judge.max_pairs`` answers against the model's
    before tuning -> (metrics, the base model's answers, each pair's outcome)."""
    # Here, not at the top: openai is not among the registered model's requirements.
    from lm.finetune.judge import judge_metrics, judge_pairs

    if who.base is None:
        raise DataError("evaluate.judge compares the tuned model with the model before tuning: pass base_dir")
    n = min(settings.judge.max_pairs, len(prompts))
    base = who.base.answer(prompts[:n], {"max_new_tokens": settings.max_new_tokens})["response"].str.strip().tolist()
    outcomes = judge_pairs(settings.judge, [prompt_text(p) for p in prompts[:n]], references[:n], responses[:n], base)
    return judge_metrics(outcomes), base, outcomes


def score_split(
    who: Responders, conversations: list[list[Message]], settings: EvaluateConfig
) -> tuple[dict[str, float], pd.DataFrame]:
    """One held-out split's metrics (unprefixed names) and its generations table."""
    model = who.tuned.model
    examples = encode_examples(who.tuned.fmt, conversations, model.args.seq_len)
    loss = response_loss(model, examples, who.pad_id)
    metrics = {"response_loss": loss, "response_ppl": math.exp(min(loss, 50.0))}
    if who.base is not None:
        metrics["base_response_loss"] = response_loss(who.base.model, examples, who.pad_id)
    shown = conversations[: settings.generate_prompts]
    prompts = [c[:-1] for c in shown]
    references = [c[-1]["content"] for c in shown]
    responses = who.tuned.answer(prompts, {"max_new_tokens": settings.max_new_tokens})["response"].str.strip().tolist()
    baseline = nearest_neighbour_responses(who.train, prompts)
    metrics.update(text_scores(responses, references))
    metrics.update({f"baseline_{k}": v for k, v in text_scores(baseline, references).items()})
    metrics.update({"examples": float(len(conversations)), "generated_examples": float(len(shown)),
                    "truncated_examples": float(examples.truncated)})
    table = pd.DataFrame({
        "prompt": [prompt_text(p) for p in prompts],
        "reference": references,
        "response": responses,
        "baseline_response": baseline,
        "chrf": [round(chrf([h], [r]), 2) for h, r in zip(responses, references, strict=True)],
        "rouge_l": [round(rouge_l([h], [r]), 2) for h, r in zip(responses, references, strict=True)],
    })
    if settings.judge.url:
        counts, base, outcomes = judged(who, prompts, references, responses, settings)
        metrics.update(counts)
        rest = [None] * (len(shown) - len(base))
        table["base_response"], table["judge"] = base + rest, outcomes + rest
    return metrics, table


def evaluate(
    model_dir: Path,
    data_dir: Path,
    tokenizer_path: Path,
    *,
    base_dir: Path | None = None,
    out_dir: Path,
    settings: EvaluateConfig | None = None,
) -> dict[str, float]:
    """On the test split (``eval/``) and, when the finetune_data stage wrote one, the team's own
    evaluation set (``eval_set/``): the response loss of the tuned and the pretrained (``base_dir``)
    model; greedy answers to the first ``settings.generate_prompts`` prompts scored by chrF, ROUGE-L
    and exact match beside the nearest-neighbour responder and, with ``settings.judge.url``, judged
    against the pretrained model's; writes generations.csv (and eval_set_generations.csv)."""
    settings = settings or EvaluateConfig()
    tuned = Predictor(model_dir, tokenizer_path=tokenizer_path)
    base = tuned.with_model(load_model(base_dir)) if base_dir is not None else None
    who = Responders(tuned, base, read_split(data_dir, "train"), int(tuned.model.meta["pad_id"]))
    metrics, table = score_split(who, read_split(data_dir, "test"), settings)
    out = {f"eval/{TEST_NAMES.get(k, k)}": v for k, v in metrics.items()}
    table.to_csv(Path(out_dir) / GENERATIONS, index=False)
    if split_path(data_dir, EVAL_SET).is_file():
        eval_set = read_split(data_dir, EVAL_SET)
        if not eval_set:
            raise DataError(f"{split_path(data_dir, EVAL_SET)} holds no conversation: give evaluate.data some questions")
        metrics, table = score_split(who, eval_set, settings)
        out.update({f"{EVAL_SET}/{k}": v for k, v in metrics.items()})
        table.to_csv(Path(out_dir) / EVAL_SET_GENERATIONS, index=False)
    return out


# ---- export and prediction ----------------------------------------------------------------------


def end_of_turn(config: dict[str, Any], tokenizer) -> str:
    """The token that ends an assistant's reply under the config's template: its family's end-of-turn
    token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``), else the end-of-text
    token (what a server stops at, and the export's eos_token)."""
    ends = turn_ends(config["chat_template"], tokenizer)
    return ends[0] if ends else config["eos_token"]


def model_card(model: nn.Module, data_dir: Path, model_dir: Path) -> str:
    """README.md of the Hugging Face folder: what export knows of the model, its data and its training."""
    from lm.fileio import file_sha256
    from lm.training.launch import RESULT

    a, meta = model.args, model.meta
    ft = meta.get("finetune", {})
    lora = ft.get("lora")
    train = Path(data_dir) / "train.parquet"
    # Another chat method (dpo) exports through this card: its meta names how it tuned the model.
    task, tuned = meta.get("task", "sft"), meta.get("tuned_as", "instruction-tuned")
    lines = [
        f"# lmforge {tuned} model",
        "",
        (f"A {count_params(model):,}-parameter {a.family} decoder (`{(a.hf_config.get('architectures') or [a.family])[0]}`), imported "
         f"from Hugging Face and {tuned} with lmforge (`finetune.task={task}`)." if a.hf_config else
         f"A {count_params(model):,}-parameter Llama-architecture decoder, pretrained and {tuned} "
         f"with lmforge (`finetune.task={task}`).")
        + " It answers in the chat format of its `tokenizer_config.json` (`chat_template`).",
        "",
        f"- Model: {a.n_layer} layers, d_model {a.d_model}, {a.n_head} heads ({a.n_kv_head} key/value), "
        f"vocabulary {a.vocab_size}, context {a.seq_len} tokens",
        f"- Fine-tuning data: `{ft.get('data', '?')}`, training split sha256 `{file_sha256(train)[:16]}`",
        f"- Fine-tuning: {ft.get('max_steps', '?')} steps, lr {ft.get('lr', '?')}, "
        + (f"LoRA r={lora['r']}, alpha={lora['alpha']} on {', '.join(lora['target_modules'])}, merged into the weights"
           if lora else "all weights")
        + (", packed sequences" if ft.get("packing") else "")
        + (f", {ft['objective']}" if ft.get("objective") else ""),
    ]
    result = Path(model_dir) / RESULT
    if result.is_file():
        final = json.loads(result.read_text())["metrics"]
        if task == "sft" and final.get("val/loss") is not None:
            lines.append(f"- Validation response loss at the end of fine-tuning: {final['val/loss']:.4f} (assistant tokens only)")
        elif task != "sft":
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items()) if k.startswith("val/"))
            lines.append(f"- Validation at the end of fine-tuning: {shown}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("./hf")',
        'model = AutoModelForCausalLM.from_pretrained("./hf")',
        'messages = [{"role": "user", "content": "What does `json.dumps(obj)` do?"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)[\"input_ids\"]",
        "out = model.generate(ids, max_new_tokens=48)",
        "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "## Serve with vLLM",
        "",
        "```bash",
        f"vllm serve ./hf --max-model-len {a.seq_len}",
        "curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        "  -d '{\"model\": \"./hf\", \"messages\": [{\"role\": \"user\", \"content\": \"What does `json.dumps(obj)` do?\"}]}'",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(model_dir: Path, data_dir: Path, *, out_dir: Path) -> list[str]:
    """tokenizer_config.json (the chat template) beside tokenizer.json; ``hf/``: the tuned model as a
    Hugging Face folder of its family with its chat template and a model card; after LoRA, ``adapter/``:
    the adapter itself, for ``peft.PeftModel.from_pretrained`` on the model it was tuned from."""
    from lm.fileio import atomic_write
    from lm.finetune.lora import load_adapter
    from lm.models.hf import export_adapter, export_hf
    from lm.text.tokenizer import TOKENIZER, load_tokenizer

    out_dir = Path(out_dir)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(out_dir / TOKENIZER)
    config = dict(model.meta["tokenizer_config"])
    # A chat model's text ends where its reply does: the end-of-turn token is its eos_token.
    eos = end_of_turn(config, tokenizer)
    config.update(eos_token=eos, model_max_length=model.args.seq_len)
    atomic_write(out_dir / TOKENIZER_CONFIG, json.dumps(config, indent=2, ensure_ascii=False))
    stops = ChatFormat(tokenizer, config).stop_ids + (int(model.meta["eot_id"]),)
    export_hf(
        model,
        out_dir / TOKENIZER,
        out_dir / HF_DIR,
        chat_template=config["chat_template"],
        special_tokens={"eos_token": eos, "pad_token": config["pad_token"], "bos_token": None},
        generation_config={"eos_token_id": list(dict.fromkeys(stops)), "do_sample": False},
        card=model_card(model, data_dir, model_dir),
    )
    adapter = load_adapter(model_dir)
    if adapter is None:
        return [TOKENIZER_CONFIG, HF_DIR]
    tensors, meta = adapter
    export_adapter(model, tensors, meta["r"], meta["alpha"], out_dir / ADAPTER_DIR)
    return [TOKENIZER_CONFIG, HF_DIR, ADAPTER_DIR]


class Predictor:
    """Answer prompts with an exported instruction-tuned folder (model.safetensors, model.json,
    tokenizer.json, tokenizer_config.json with the chat template)."""

    PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")
    # The registered model's params schema (MLflow passes only declared params through predict):
    # defaults that mean "off" (top_k 0, seed -1, stop [""]) where the sampling default is None.
    PARAM_DEFAULTS = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                      "repetition_penalty": 1.0, "stop": [""], "seed": -1}

    def __init__(self, folder: str | Path, tokenizer_path: str | Path | None = None):
        from lm.text.tokenizer import TOKENIZER, load_tokenizer

        folder = Path(folder)
        self.model = load_model(folder)
        if not getattr(self.model, "causal", False):
            raise DataError(f"{folder} holds a {self.model.meta.get('kind')} model; sft answers with a decoder")
        tokenizer = load_tokenizer(Path(tokenizer_path) if tokenizer_path else folder / TOKENIZER)
        config_path = folder / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text()) if config_path.is_file() else self.model.meta["tokenizer_config"]
        self.fmt = ChatFormat(tokenizer, config)
        self.stop_ids = tuple(dict.fromkeys([*self.fmt.stop_ids, int(self.model.meta["eot_id"])]))
        self.system_prompt: str | None = self.model.meta.get("system_prompt")

    def with_model(self, model: nn.Module) -> Predictor:
        """The same chat format, stop tokens and system prompt answering with another network of
        the same tokenizer (the model before tuning, for the judge)."""
        other = copy.copy(self)
        other.model = model
        return other

    def conversations(self, inputs: pd.DataFrame) -> list[list[Message]]:
        """The prompts of a ``messages`` column (lists of {role, content}) or a ``prompt`` column."""
        from lm.data.instruct import parse_messages

        if "messages" in inputs.columns:
            return [parse_messages(v, "the input", f"row {i + 1}", "messages") for i, v in enumerate(inputs["messages"])]
        if "prompt" in inputs.columns:
            return [[{"role": "user", "content": str(p)}] for p in inputs["prompt"]]
        raise DataError(
            f"the input needs a 'prompt' or a 'messages' column; its columns are {', '.join(map(str, inputs.columns))}"
        )

    def answer(self, conversations: list[list[Message]], params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The model's next assistant turn in each conversation (see :meth:`predict`)."""
        from lm.generation.sampling import SamplingParams, generate

        params = {k: v for k, v in (params or {}).items() if v is not None}
        off = {"top_k": 0, "seed": -1}
        params = {k: v for k, v in params.items() if not (k in off and v is not None and int(v) == off[k])}
        if isinstance(params.get("stop"), list | tuple):
            params["stop"] = [s for s in params["stop"] if s] or None
            if params["stop"] is None:
                del params["stop"]
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise DataError(f"unknown params {unknown}: use {', '.join(self.PARAMS)}")
        params.setdefault("temperature", 0.0)  # greedy unless asked otherwise
        # The prompt needs at least one token of the context.
        params["max_new_tokens"] = min(int(params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), self.model.args.seq_len - 1)
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        try:
            sampling = SamplingParams(**params)
        except (TypeError, ValueError) as e:
            raise DataError(f"params: {e}") from None
        if self.system_prompt:  # what every training conversation began with
            conversations = [
                c if c and c[0]["role"] == "system" else [{"role": "system", "content": self.system_prompt}, *c]
                for c in conversations
            ]
        prompts = [self.fmt.encode(c, add_generation_prompt=True)[0] for c in conversations]
        out = generate(self.model, prompts, sampling, eos_ids=self.stop_ids, tokenizer=self.fmt.tokenizer)
        return pd.DataFrame(
            {
                "response": [g.text for g in out],
                "finish_reason": [g.finish_reason for g in out],
                "prompt_tokens": [g.prompt_tokens for g in out],
                "completion_tokens": [g.completion_tokens for g in out],
            }
        )

    def predict(self, inputs: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """A ``prompt`` column (a user message each) or a ``messages`` column (conversations) in;
        ``response``, ``finish_reason`` (stop | length), ``prompt_tokens``, ``completion_tokens``
        out. ``params``: max_new_tokens (64), temperature (0 = greedy, the default), top_k, top_p,
        repetition_penalty, stop (strings), seed."""
        return self.answer(self.conversations(inputs), params)

    @staticmethod
    def input_example() -> pd.DataFrame:
        return pd.DataFrame({"prompt": ["What does `json.dumps(obj, *, skipkeys=False, ...)` do?"]})
