"""Export: one self-contained folder that the registry, a server and other tools load without
lmforge's training code, its work directory or pickles. Every path inside it is relative; nothing
in it names the machine or the folders it was trained in.

    model.safetensors, model.json   the fine-tuned network (model.json: shape, method, token ids, ...)
    tokenizer.json                  Hugging Face ``tokenizers`` format
    lm/                             the pretrained language model it was fine-tuned from
    hf/                             the decoder as a Hugging Face Llama folder (the tuned one for sft,
                                    the pretrained one for a classifier)
    ...                             what the fine-tuning method adds (labels.json for classify)
    README.md                       what is in the folder
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lm.models.folder import MODEL_JSON, MODEL_WEIGHTS, load_model
from lm.models.transformer import count_params
from lm.pipeline.stage import StageResult
from lm.text.shards import TokenIndex
from lm.text.tokenizer import TOKENIZER, load_tokenizer

LM_DIR = "lm"


def _card_provenance(card: Path, metrics: dict[str, float], run_id: str | None) -> None:
    """Append what the evaluation measured and the MLflow run that made the model to a model card."""
    lines = ["", "## Evaluation (held-out data; each metric beside its baseline)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items())]
    if run_id:
        lines += ["", f"Made by the MLflow run `{run_id}` (its parent run is the whole pipeline run)."]
    with card.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _lm_as_hf(lm: torch.nn.Module, out_dir: Path, tokens_dir: Path) -> list[str]:
    """When the method wrote no Hugging Face folder (a classifier), the pretrained decoder it was
    tuned from (``lm``) gets one, ``hf/``: every decoder lmforge trains can leave for the ecosystem."""

    from lm.models.hf import export_hf
    from lm.models.transformer import Decoder
    from lm.text.chat import read_own_config

    if not isinstance(lm, Decoder):
        return []  # an encoder: lm/ holds it in lmforge's format
    index = TokenIndex.load(tokens_dir)
    config = read_own_config(tokens_dir) or {}
    tokenizer = load_tokenizer(out_dir / TOKENIZER)
    eos = tokenizer.id_to_token(index.eot_id)
    export_hf(
        lm,
        out_dir / TOKENIZER,
        out_dir / "hf",
        chat_template=None,  # a pretrained model continues text; it was never taught to chat
        special_tokens={"eos_token": eos, "pad_token": config.get("pad_token") or eos, "bos_token": None},
        generation_config={"eos_token_id": index.eot_id, "do_sample": False},
        card=(
            "# lmforge pretrained language model\n\n"
            f"The decoder the classifier in the parent folder was fine-tuned from: {lm.args.n_layer} layers, "
            f"d_model {lm.args.d_model}, vocabulary {lm.args.vocab_size}, context {lm.args.seq_len} tokens. "
            "It continues text; it was not instruction-tuned.\n"
        ),
    )
    return ["hf"]


def export(
    task: str,
    finetune_dir: Path,
    pretrain_dir: Path,
    tokens_dir: Path,
    ft_data_dir: Path,
    *,
    out_dir: Path,
    metrics: dict[str, float] | None = None,
    run_id: str | None = None,
) -> StageResult:
    """``metrics`` (the evaluate stage's) and ``run_id`` (the MLflow run) go into the model card."""
    from lm.finetune import method

    out_dir = Path(out_dir)
    (out_dir / LM_DIR).mkdir()
    for name in (MODEL_WEIGHTS, MODEL_JSON):
        shutil.copy2(Path(finetune_dir) / name, out_dir / name)
        shutil.copy2(Path(pretrain_dir) / name, out_dir / LM_DIR / name)
    shutil.copy2(Path(tokens_dir) / TokenIndex.load(tokens_dir).tokenizer, out_dir / TOKENIZER)
    added = method(task).export(Path(finetune_dir), Path(ft_data_dir), out_dir=out_dir)
    lm = load_model(out_dir / LM_DIR)
    if not (out_dir / "hf").exists():
        added += _lm_as_hf(lm, out_dir, Path(tokens_dir))
    if (out_dir / "hf" / "README.md").is_file() and (metrics or run_id):
        _card_provenance(out_dir / "hf" / "README.md", metrics or {}, run_id)

    # Load what was written, as a consumer would, and run it once: an export that cannot be
    # loaded must fail here, not at deploy time.
    predictor = method(task).Predictor(out_dir)
    predictor.predict(predictor.input_example())
    model = predictor.model
    with torch.no_grad():
        lm(torch.zeros(1, min(8, lm.args.seq_len), dtype=torch.long))
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    (out_dir / "README.md").write_text(
        "# lmforge model\n\n"
        f"- `{MODEL_WEIGHTS}` + `{MODEL_JSON}`: the fine-tuned model (method `{task}`), {count_params(model):,} parameters\n"
        f"- `{LM_DIR}/`: the pretrained {lm.args.kind} it started from, {count_params(lm):,} parameters, "
        f"vocabulary {lm.args.vocab_size}\n"
        f"- `{TOKENIZER}`: the tokenizer (Hugging Face `tokenizers`)\n"
        + "".join(f"- `{name}`\n" for name in added)
        + "\nLoad with `lm.finetune.method(task).Predictor(folder)`, or through the MLflow registry "
        "(`mlflow.pyfunc.load_model('models:/NAME@champion')`).\n"
    )
    return StageResult(
        metrics={"export/size_mb": size / 1e6, "export/params": float(count_params(model))},
        artifacts=[MODEL_JSON, *added, "README.md"],
        outputs={"model": ".", "lm": LM_DIR},
    )
