"""``lmforge``: run the whole pipeline, or one stage (and what it needs, from cache when unchanged).

Examples:
  lmforge run                                   # the demo: conf/default.yaml on the stdlib corpus
  lmforge run --config conf/tiny.yaml pretrain.max_steps=50
  lmforge data --config my.yaml data.sources=[docs/,notes/*.md]
  lmforge config --config conf/gpt2-124m.yaml   # print the resolved config
  lmforge schedule --cron "0 3 * * 1"           # retrain every Monday at 03:00 (Prefect deployment)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lm.config import Config, list_presets, load_config
from lm.errors import LmforgeError

STAGE_COMMANDS = {
    "run": ("deploy", "run the whole pipeline: ingest, clean, tokenize, pretrain, finetune, evaluate, export, deploy"),
    "data": ("data", "ingest, clean, deduplicate and tokenize the corpus; build the fine-tuning data"),
    "pretrain": ("pretrain", "pretrain the language model (after the data stages)"),
    "finetune": ("finetune", "fine-tune the classifier on the pretrained model"),
    "evaluate": ("evaluate", "evaluate the language model and the classifier beside their baselines"),
    "export": ("export", "write the model folder: safetensors weights, config, tokenizer"),
    "deploy": ("deploy", "register the exported model in MLflow; promote it if it beats the champion"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_) in STAGE_COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        _config_args(sp)
    sp = sub.add_parser("config", help="print the resolved config (preset + overrides) as YAML")
    _config_args(sp)
    sp = sub.add_parser("schedule", help="serve the pipeline as a Prefect deployment that retrains on a cron schedule",
                        description="Serve the pipeline as a Prefect deployment run on a cron schedule (one run "
                        "at a time); it can also be triggered from the Prefect UI. Runs until stopped.")
    sp.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * 1" (Mondays 03:00)')
    sp.add_argument("--name", default="retrain", help="deployment name (default: retrain)")
    _config_args(sp)
    return p


def _config_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", "-c", metavar="FILE",
                    help=f"YAML config (default conf/default.yaml; presets: {', '.join(list_presets())})")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="override any config key, e.g. pretrain.max_steps=100 data.sources=[a,b]")


def preflight(cfg: Config) -> None:
    """Everything that can be checked before the first stage starts: fail in seconds, not later."""
    from lm import tracking
    from lm.data import sources
    from lm.workspace import fingerprint_sources

    tracking.check_tracking_uri(cfg.tracking_uri())
    fingerprint_sources(cfg.data.sources)  # a missing path stops here, naming it
    if cfg.finetune.data != "stdlib":
        next(sources.resolve(cfg.finetune.data))  # raises DataError naming a missing path
    if cfg.tokenizer.kind == "file":
        next(sources.resolve(cfg.tokenizer.path))
    workdir = Path(cfg.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)


def _summary(cfg: Config, out: dict, seconds: float) -> str:
    lines = ["", f"lmforge: pipeline finished in {seconds / 60:.1f} min"]
    if "evaluate" in out:
        m = json.loads((Path(out["evaluate"]) / "metrics.json").read_text())
        shown = ["val/loss", "val/ppl", "eval/bpb", "eval/baseline_bpb", "eval/accuracy", "eval/macro_f1",
                 "eval/baseline_accuracy"]
        lines += [f"  {k:<22} {m[k]:.4f}" for k in shown if k in m]
    if "deploy" in out:
        d = json.loads((Path(out["deploy"]) / "manifest.json").read_text())
        promoted = "promoted to" if d["metrics"].get("deploy/promoted") else "registered; not better than"
        lines.append(f"  model {d['outputs']['model_uri']} {promoted} {d['outputs']['alias_uri']}")
    uri = out["tracking_uri"]
    lines += [
        f"  MLflow parent run: {out['mlflow_run_id']}  (tracking {uri})",
        f"  dashboard: make ui   (or: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(cfg.to_yaml(), end="")
            return 0
        preflight(cfg)
        config_file = str(Path(args.config).resolve()) if args.config and Path(args.config).is_file() else args.config
        # Persisted task results (the cache records) live beside the outputs they point to, so
        # removing the work directory forgets both.
        os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path(cfg.workdir).expanduser().resolve() / ".prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from flows.pipeline import pipeline
        from tasks.common import quiet_user_errors

        quiet_user_errors()
        if args.command == "schedule":
            from flows.schedule import serve_retraining

            print(f"lmforge: serving deployment 'lmforge-pipeline/{args.name}' on cron {args.cron!r}; Ctrl-C stops")
            serve_retraining(args.name, args.cron, config_file, list(args.overrides))
            return 0

        t0 = time.monotonic()
        out = pipeline(config_file=config_file, overrides=list(args.overrides), until=STAGE_COMMANDS[args.command][0])
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # Prefect may wrap our errors; show ours without the traceback
        from tasks.common import user_error_message

        msg = user_error_message(e)
        if msg is None:
            raise
        print(f"lmforge: error: {msg}", file=sys.stderr)
        return 2
    print(_summary(cfg, out, time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
