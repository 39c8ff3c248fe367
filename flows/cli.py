"""``lmforge``: run the whole pipeline, or one stage (and what it needs, from cache when unchanged).

Examples:
  lmforge run                                   # the demo: conf/default.yaml on the stdlib corpus
  lmforge run --config conf/tiny.yaml pretrain.max_steps=50
  lmforge data --config my.yaml data.sources=[docs/,notes/*.md]
  lmforge tokenize tokenizer.vocab_size=16000   # ingest, clean and tokenize (from cache when unchanged)
  lmforge config --config conf/gpt2-124m.yaml   # print the resolved config
  lmforge schedule --cron "0 3 * * 1"           # retrain every Monday at 03:00 (Prefect deployment)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lm.config import Config, display_uri, list_presets, load_config
from lm.errors import LmforgeError
from lm.stage import Stage
from lm.stages import STAGES, groups, stages_for

# A temporary Prefect server (no PREFECT_API_URL) must start within this many seconds. Prefect's
# default, 20 s, is not enough on a busy 2-core machine, where a run then died before its first
# stage ("Timed out while attempting to connect to ephemeral Prefect API server").
EPHEMERAL_STARTUP_SECONDS = "120"


def commands(table: Sequence[Stage]) -> dict[str, tuple[list[str], str]]:
    """CLI command -> (the targets it runs, help), derived from the stage table."""
    out = {"run": ([], "run the whole pipeline: " + ", ".join(s.name for s in table))}
    for group, names in groups(table).items():
        out[group] = ([group], f"run the {group} stages: {', '.join(names)}")
    for stage in table:
        out[stage.command] = ([stage.name], f"{stage.help} (after the stages it needs)")
    return out


def _parser(table: Sequence[Stage]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_) in commands(table).items():
        _config_args(sub.add_parser(name, help=help_, description=help_))
    _config_args(sub.add_parser("config", help="print the resolved config (preset + overrides) as YAML"))
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


SHOWN = ["eval/loss", "eval/ppl", "eval/bpb", "eval/baseline_bpb", "eval/mlm_loss", "eval/mlm_accuracy",
         "eval/baseline_mlm_loss", "eval/accuracy", "eval/macro_f1", "eval/baseline_accuracy"]


def _summary(out: dict, seconds: float, uri: str) -> str:
    lines = ["", f"lmforge: pipeline finished in {seconds / 60:.1f} min"]
    if "evaluate" in out:
        m = json.loads((Path(out["evaluate"]) / "metrics.json").read_text())
        lines += [f"  {k:<22} {m[k]:.4f}" for k in SHOWN if k in m]
    if "deploy" in out:
        d = json.loads((Path(out["deploy"]) / "manifest.json").read_text())
        promoted = "promoted to" if d["metrics"].get("deploy/promoted") else "registered; not better than"
        lines.append(f"  model {d['outputs']['model_uri']} {promoted} {d['outputs']['alias_uri']}")
    from lm.tracking import run_page

    shown = display_uri(uri)
    lines += [
        f"  MLflow parent run: {out['mlflow_run_id']}  (tracking {shown})",
        f"  dashboard: make ui, then {run_page(uri, out['mlflow_run_id'])}",
        f"             (or: mlflow ui --backend-store-uri {shown} --host 127.0.0.1)",
    ]
    return "\n".join(lines)


def _prefect_environment(cfg: Config) -> None:
    # Persisted task results (the cache records) live beside the outputs they point to, so
    # removing the work directory forgets both.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path(cfg.workdir).expanduser().resolve() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS)


def main(argv: list[str] | None = None, table: Sequence[Stage] = STAGES) -> int:
    args = _parser(table).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # the one parse of this run's config
        if args.command == "config":
            print(cfg.to_yaml(), end="")
            return 0
        targets = [] if args.command == "schedule" else commands(table)[args.command][0]
        _prefect_environment(cfg)
        from flows.pipeline import build_pipeline, check, pipeline
        from tasks.common import quiet_user_errors

        check(cfg, stages_for(targets, table))  # seconds, before Prefect starts
        quiet_user_errors()
        if args.command == "schedule":
            from flows.schedule import serve_retraining

            print(f"lmforge: serving deployment 'lmforge-pipeline/{args.name}' on cron {args.cron!r}; Ctrl-C stops")
            serve_retraining(args.name, args.cron, cfg)
            return 0
        t0 = time.monotonic()
        flow_ = pipeline if table is STAGES else build_pipeline(table)
        out = flow_(config=cfg, targets=targets)
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
    print(_summary(out, time.monotonic() - t0, cfg.tracking_uri()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
