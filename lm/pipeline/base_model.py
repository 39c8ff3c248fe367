"""Where the network starts (``model.init_from``): the ``base_model`` stage brings an existing model
into lmforge's own folder format, with its tokenizer, so that every later stage reads one format.

    None                        pretrain from scratch (the folder holds only source.json)
    models:/NAME@ALIAS, models:/NAME/VERSION
                                a registered lmforge model: its export folder, from the registry
    an lmforge export folder    model.json + model.safetensors (+ tokenizer.json): the decoder it
                                holds, or the backbone of a classifier
    a Hugging Face folder       config.json + model.safetensors (+ tokenizer.json), as
                                ``save_pretrained`` writes it: a Llama decoder or a BERT encoder
    a .ckpt / .safetensors file weights of the configured shape (continued pretraining)

``source.json`` says what was found: its kind, the architecture, whether a tokenizer came with it
and which of its tokens end a text, pad and mask. Nothing here downloads from the internet: a
registered model comes from the team's own MLflow server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from lm.config import Config
from lm.errors import ConfigError
from lm.fileio import atomic_write, file_sha256
from lm.models.source import SOURCE, check_tokenizer_fits, read_source
from lm.pipeline.stage import StageResult

REGISTERED_PREFIX = "models:/"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def fingerprint(cfg: Config) -> Any:
    """What the base model's identity is beyond the config string: every file of a folder (path,
    size, modification time), or the version and run an alias points at now (it moves)."""
    spec = cfg.model.init_from
    if spec is None:
        return None
    if spec.startswith(REGISTERED_PREFIX):
        from lm.tracking.registry import resolve_registered

        found = resolve_registered(spec, cfg.tracking_uri(), missing_ok=cfg.model.init_from_fallback == "scratch")
        return found if found is not None else {"scratch": f"{spec} is not registered yet"}
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"model.init_from={spec!r} does not exist: give a model folder, a checkpoint or models:/NAME@ALIAS")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _token(tokenizer, token_id: int | None) -> str | None:
    return None if token_id is None else tokenizer.id_to_token(int(token_id))


def _special_tokens(tok_dir: Path, fallback_ids: dict[str, int] | None = None) -> list[str]:
    """[end of text, padding, mask] of a tokenizer folder, by tokenizer_config.json's names, else by
    the ids a model.json records; a missing pad or mask is the end-of-text token (as lmforge's own)."""
    from lm.text.chat import read_own_config
    from lm.text.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir / "tokenizer.json")
    conf = read_own_config(tok_dir) or {}

    def name(key: str) -> str | None:
        value = conf.get(key)
        if isinstance(value, dict):  # {"content": "</s>", ...} in older files
            value = value.get("content")
        return value if isinstance(value, str) and tok.token_to_id(value) is not None else None

    ids = fallback_ids or {}
    eos = name("eos_token") or name("sep_token") or _token(tok, ids.get("eot_id"))
    if eos is None:
        raise ConfigError(
            f"{tok_dir}: the tokenizer names no end-of-text token (eos_token in tokenizer_config.json): "
            "add one, or pretrain with lmforge's own tokenizer"
        )
    pad = name("pad_token") or _token(tok, ids.get("pad_id")) or eos
    mask = name("mask_token") or _token(tok, ids.get("mask_id")) or eos
    return [eos, pad, mask]


def _copy_tokenizer(src: Path, out_dir: Path) -> bool:
    if not (src / "tokenizer.json").is_file():
        return False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)
    return True


def _from_lmforge_folder(folder: Path, out_dir: Path) -> dict[str, Any]:
    from lm.models.folder import load_model, read_model_json, save_model
    from lm.models.transformer import count_params

    meta = read_model_json(folder)
    net = load_model(folder)
    if hasattr(net, "backbone"):  # a classifier: start from its backbone
        net = net.backbone
    save_model(net, out_dir)
    has_tokenizer = _copy_tokenizer(folder, out_dir)
    return {
        "arch": getattr(net.args, "arch", "llama"),
        "model_kind": net.args.kind,
        "params": count_params(net),
        "vocab_size": net.args.vocab_size,
        "tokenizer": has_tokenizer,
        "special_tokens": _special_tokens(out_dir, meta) if has_tokenizer else None,
        "task": meta.get("task"),
    }


def _from_hf_folder(folder: Path, out_dir: Path) -> dict[str, Any]:
    from lm.models.hf import import_hf

    info = import_hf(folder, out_dir)  # what it wrote, so the folder need not be read back
    return {
        "arch": info["arch"],
        "model_kind": info["kind"],
        "params": info["params"],
        "vocab_size": info["vocab_size"],
        "tokenizer": True,
        "special_tokens": _special_tokens(out_dir),
        "architecture": info.get("architecture"),
    }


def prepare_base(cfg: Config, *, out_dir: Path) -> StageResult:
    """The base_model stage: ``model.init_from`` in lmforge's format, or a note that there is none."""
    out_dir = Path(out_dir)
    spec = cfg.model.init_from
    if spec is not None and spec.startswith(REGISTERED_PREFIX) and cfg.model.init_from_fallback == "scratch":
        from lm.tracking.registry import resolve_registered

        if resolve_registered(spec, cfg.tracking_uri(), missing_ok=True) is None:  # the first run of a retrain loop
            atomic_write(out_dir / SOURCE, json.dumps({"kind": "scratch", "fallback_from": spec}, indent=2))
            return StageResult(params={"base_model.kind": "scratch", "base_model.fallback_from": spec},
                               tags={"lmforge.init_fallback": f"{spec} is not registered yet: pretrained from scratch"},
                               artifacts=[SOURCE], outputs={"source": SOURCE})
    if spec is None:
        atomic_write(out_dir / SOURCE, json.dumps({"kind": "scratch"}, indent=2))
        return StageResult(params={"base_model.kind": "scratch"}, artifacts=[SOURCE], outputs={"source": SOURCE})
    source: dict[str, Any] = {"spec": spec}
    if spec.startswith(REGISTERED_PREFIX):
        from lm.tracking.registry import download_registered

        download = out_dir / ".registered"
        folder, version = download_registered(spec, cfg.tracking_uri(), download)
        source.update(kind="registered", version=version, **_from_lmforge_folder(folder, out_dir))
        shutil.rmtree(download)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(f"model.init_from={spec!r} does not exist: give a model folder, a checkpoint or models:/NAME@ALIAS")
        if path.is_file():
            if path.suffix not in (".ckpt", ".safetensors"):
                raise ConfigError(
                    f"model.init_from={spec!r} is a {path.suffix or 'suffix-less'} file: give a Lightning .ckpt "
                    "or a .safetensors file of the configured model, or a model folder"
                )
            # Weights of the configured shape: loaded (and checked) by the pretrain stage.
            source.update(kind="checkpoint", path=str(path.resolve()), tokenizer=False, model_kind=cfg.model.kind)
        elif (path / "config.json").is_file():
            source.update(kind="hf", **_from_hf_folder(path, out_dir))
        elif (path / "model.json").is_file():
            source.update(kind="lmforge", **_from_lmforge_folder(path, out_dir))
        else:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ConfigError(
                f"model.init_from={spec!r} is neither a Hugging Face model folder (config.json + model.safetensors) "
                f"nor an lmforge model folder (model.json + model.safetensors); it holds {found}"
            )
    if source["model_kind"] != cfg.model.kind:
        raise ConfigError(
            f"model.init_from={spec!r} is {'an' if source['model_kind'] == 'encoder' else 'a'} {source['model_kind']}, "
            f"but model.kind={cfg.model.kind}: set model.kind={source['model_kind']}"
        )
    atomic_write(out_dir / SOURCE, json.dumps(source, indent=2, sort_keys=True))
    metrics = {"base_model/params": float(source["params"])} if "params" in source else {}
    params = {f"base_model.{k}": source[k] for k in ("kind", "arch", "architecture", "version") if k in source}
    artifacts = [SOURCE] + [n for n in ("model.json", "tokenizer_config.json") if (out_dir / n).is_file()]
    return StageResult(metrics=metrics, params=params, artifacts=artifacts, outputs={"source": SOURCE})


def use_as_pretrained(base_dir: Path, tokens_dir: Path, out_dir: Path) -> StageResult:
    """The pretrain stage when pretraining is skipped: the base model, as the pretrained model, with
    the token ids of the tokenizer it came with; the same files training would leave."""
    from lm.models.folder import MODEL_WEIGHTS, load_model, save_model
    from lm.text.shards import TokenIndex
    from lm.training.launch import RESULT, training_result

    source = read_source(base_dir)
    if source is None or source["kind"] == "checkpoint":
        raise ConfigError("pretraining can be skipped only when model.init_from names a model folder or a registered model")
    index = TokenIndex.load(tokens_dir)
    net = load_model(base_dir)
    check_tokenizer_fits(index.vocab_size, net.args.vocab_size, source["spec"])
    save_model(net, out_dir, extra=index.special_ids())
    result = {"metrics": {}, "weights_sha256": file_sha256(Path(out_dir) / MODEL_WEIGHTS), "skipped": True}
    atomic_write(Path(out_dir) / RESULT, json.dumps(result, indent=2))
    return training_result("pretrain", Path(out_dir))
