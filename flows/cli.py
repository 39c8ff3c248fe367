"""``lmforge``: run the whole pipeline, or one stage (and what it needs, from cache when unchanged).

Examples:
  lmforge run                                   # the demo: conf/default.yaml on the stdlib corpus
  lmforge run --config conf/tiny.yaml pretrain.max_steps=50
  lmforge data --config my.yaml data.sources=[docs/,notes/*.md]
  lmforge tokenize tokenizer.vocab_size=16000   # ingest, clean and tokenize (from cache when unchanged)
  lmforge config --config conf/gpt2-124m.yaml   # print the resolved config
  lmforge report --last 10                      # compare the newest pipeline runs in the terminal
  lmforge schedule --cron "0 3 * * 1"           # retrain every Monday at 03:00, and when new data lands
  lmforge trigger retrain pretrain.max_steps=50 # start a deployment's run on the Prefect server, follow it
  lmforge serve --model models:/lmforge-demo@champion   # OpenAI-compatible server following the champion
  lmforge generate --model runs/.../export "def " --max-new-tokens 50 --temperature 0.8
  lmforge promote lmforge-demo 3                # move @champion to version 3 by hand (recorded)
  lmforge rollback lmforge-demo                 # move @champion back to the version before
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
from lm.pipeline.stage import Stage
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
    rep = sub.add_parser("report", help="compare the recent pipeline runs of the configured MLflow experiment",
                         description=report_command.__doc__)
    rep.add_argument("--last", type=int, default=5, metavar="N", help="how many runs, newest first (default 5)")
    _config_args(rep)
    sp = sub.add_parser("schedule", help="serve the retrain, stage and new-data deployments on a Prefect server",
                        description="Serve lmforge's Prefect deployments (flows/deployments.py): the pipeline as "
                        "'retrain' (on a cron schedule when given), one per stage, and the new-data check that "
                        "starts 'retrain' when enough new source files appear (config section retrain). One run "
                        "of each at a time; all can be triggered from the Prefect UI or with lmforge trigger. "
                        "Runs until stopped.")
    sp.add_argument("--cron", help='cron schedule of the retrain, e.g. "0 3 * * 1" (Mondays 03:00); default: none')
    sp.add_argument("--name", default="retrain", help="the retrain deployment's name (default: retrain)")
    sp.add_argument("--local-server", action="store_true", help="use the Prefect server on --host:--port, starting "
                    "one (SQLite under the workdir) when none answers there, instead of PREFECT_API_URL's")
    sp.add_argument("--host", default="127.0.0.1", help="--local-server's address (default %(default)s)")
    sp.add_argument("--port", type=int, default=4200, help="--local-server's port (default %(default)s)")
    sp.add_argument("--work-pool", metavar="POOL", help="register the deployments on this work pool of the server at "
                    "PREFECT_API_URL and return, instead of serving them here (prefect worker start --pool POOL "
                    "runs them where lmforge is installed)")
    sp.add_argument("--image", help="with --work-pool: the image the runs start in (Kubernetes/Docker pools; "
                    "lmforge installed in it)")
    _config_args(sp)
    tp = sub.add_parser("trigger", help="start a run of a deployment on the Prefect server and follow it to the end",
                        description="Start a run of a deployment on the Prefect server PREFECT_API_URL points at "
                        "(lmforge schedule serves them), with config overrides, and follow it to the end: its "
                        "states, its Prefect UI page and its MLflow parent run. Exit 0 when it completed.")
    tp.add_argument("deployment", metavar="DEPLOYMENT", help="retrain, a stage (tokenize, ...), watch, or FLOW/NAME")
    tp.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="override keys of the deployment's config, e.g. pretrain.max_steps=100")
    _generate_args(sub.add_parser("generate", help="continue a prompt with a trained decoder",
                                  description=generate_command.__doc__))
    _serve_args(sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible), following a registry alias",
                               description=serve_command.__doc__))
    for name, help_ in (("promote", "move a registered model's alias to a version by hand (recorded on the version)"),
                        ("rollback", "move a registered model's alias back to the version that held it before")):
        rp = sub.add_parser(name, help=help_, description=help_ + "; the tracking URI comes from the config "
                            "(tracking.uri) or MLFLOW_TRACKING_URI")
        rp.add_argument("model_name", metavar="NAME", help="registered model name, e.g. lmforge-demo")
        if name == "promote":
            rp.add_argument("version", metavar="VERSION", help="the version to promote")
        rp.add_argument("--alias", help="the alias to move (default: deploy.alias, champion)")
        _config_args(rp)
    return p


def registry_command(args: argparse.Namespace, cfg: Config) -> int:
    """``lmforge promote`` / ``lmforge rollback``: one line saying how the alias moved."""
    from lm.tracking import registry

    alias = args.alias or cfg.deploy.alias
    if args.command == "promote":
        print("lmforge: " + registry.promote(cfg.tracking_uri(), args.model_name, args.version, alias))
    else:
        print("lmforge: " + registry.rollback(cfg.tracking_uri(), args.model_name, alias))
    return 0


def report_command(args: argparse.Namespace, cfg: Config) -> int:
    """A table of the newest pipeline runs of the experiment tracking.experiment (tracking URI from the
    config or MLFLOW_TRACKING_URI): name (with its start time), trigger, documents kept, the promotion
    metric beside the champion's value, other headline metrics, decision, minutes and status."""
    from lm.errors import ConfigError
    from lm.tracking.client import check_tracking_uri
    from lm.tracking.report import comparison_table
    from lm.tracking.runs import pipeline_runs

    if args.last < 1:
        raise ConfigError(f"--last {args.last}: give a number of runs, 1 or more")
    uri = cfg.tracking_uri()
    check_tracking_uri(uri)
    runs = pipeline_runs(uri, cfg.tracking.experiment, args.last)
    if not runs:
        print(f"lmforge: no pipeline runs in experiment {cfg.tracking.experiment!r} at {display_uri(uri)} yet")
        return 0
    print(f"lmforge: the {len(runs)} newest pipeline runs of {cfg.tracking.experiment!r} ({display_uri(uri)})")
    print(comparison_table(runs))
    return 0


def _generate_args(sp: argparse.ArgumentParser) -> None:
    # Defaults as lm.generation.sampling.SamplingParams's, written out: parsing must not import torch.
    sp.add_argument("prompt", help="the text to continue")
    sp.add_argument("--model", "-m", required=True, metavar="PATH",
                    help="an lmforge decoder or export folder (model.json, tokenizer.json in it or its parent) "
                    "or a Hugging Face LlamaForCausalLM folder")
    sp.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json, when it is not in the model folder")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="default %(default)s")
    sp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default %(default)s")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    sp.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty (default 1 = off)")
    sp.add_argument("--stop", action="append", default=[], metavar="S", help="stop before this string (repeatable)")
    sp.add_argument("--seed", type=int, help="seed the sampling (same seed, same text)")
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")


def generate_command(args: argparse.Namespace) -> int:
    """Continue a prompt with a trained decoder and print the completion (to the first stop string,
    end-of-text token or --max-new-tokens)."""
    from lm.generation.sampling import SamplingParams, generate_text
    from lm.models.load_for_generation import load_for_generation

    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
        )
    except ValueError as e:
        raise LmforgeError(str(e)) from None
    gm = load_for_generation(args.model, args.tokenizer)
    prompt = gm.chat_prompt(args.prompt) if args.chat else args.prompt
    if not gm.tokenizer.encode(prompt).ids:
        raise LmforgeError("the prompt is empty")
    try:
        [out] = generate_text(gm.model, gm.tokenizer, [prompt], params, eos_ids=gm.eos_ids)
    except ValueError as e:  # e.g. --max-new-tokens larger than the model's context
        raise LmforgeError(str(e)) from None
    print(out.text)
    return 0


def _serve_args(sp: argparse.ArgumentParser) -> None:
    # Defaults as lm.serving's, written out: parsing must not import torch.
    sp.add_argument("--model", "-m", required=True, metavar="PATH_OR_URI",
                    help="models:/NAME@ALIAS (followed: a moved alias is served without a restart), "
                    "models:/NAME/VERSION, an export folder, or a decoder folder (lmforge or Hugging Face)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    sp.add_argument("--port", type=int, default=8000, help="default %(default)s")
    sp.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health (default: $LMFORGE_API_KEY)")
    sp.add_argument("--max-concurrent", type=int, default=64, help="requests in flight; more get 429 (default %(default)s)")
    sp.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default: the model's context less one)")
    sp.add_argument("--max-new-tokens", type=int, help="largest max_tokens (default: what the context leaves)")
    sp.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; more gets 413 "
                    "(default %(default)s)")
    sp.add_argument("--timeout-s", type=float, default=300.0, help="per request, arrival to last token; past it "
                    "408 (default %(default)s)")
    sp.add_argument("--keep-alive-s", type=int, default=75, help="how long an idle connection is kept open; keep it "
                    "longer than clients' and proxies' own idle timeouts (default %(default)s)")
    sp.add_argument("--poll-seconds", type=float, default=30.0, help="how often to look where the alias points "
                    "(default %(default)s)")
    sp.add_argument("--tracking-uri", help="MLflow registry (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    sp.add_argument("--served-model-name", help="the model id clients send (default: the registered name, or the "
                    "folder as given, as vLLM does)")
    sp.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together (default %(default)s)")
    sp.add_argument("--engine-in-process", action="store_true", help="run a decoder's engine in a thread of the "
                    "server's process instead of a process of its own (slower streams; one process to debug)")


def serve_command(args: argparse.Namespace) -> int:
    """Serve a model over HTTP: OpenAI's /v1/chat/completions and /v1/completions (streaming too),
    /v1/models, /v1/classify for classifiers, /health and /metrics (Prometheus). With
    --model models:/NAME@ALIAS it follows the alias: a new version is loaded in the background and
    takes the new requests, while the old one finishes those it has."""
    from lm.serving.protocol import Limits
    from lm.serving.server import ServeOptions, serve

    for name in ("max_concurrent", "max_prompt_tokens", "max_new_tokens", "max_body_bytes", "max_batch_size",
                 "keep_alive_s"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LmforgeError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.timeout_s <= 0 or args.poll_seconds <= 0:
        raise LmforgeError("--timeout-s and --poll-seconds must be > 0")
    limits = Limits(max_concurrent=args.max_concurrent, max_prompt_tokens=args.max_prompt_tokens,
                    max_new_tokens=args.max_new_tokens, max_body_bytes=args.max_body_bytes,
                    timeout_s=args.timeout_s, api_key=args.api_key or None)
    serve(ServeOptions(model=args.model, host=args.host, port=args.port, limits=limits, poll_seconds=args.poll_seconds,
                       tracking_uri=args.tracking_uri, served_model_name=args.served_model_name,
                       max_batch_size=args.max_batch_size, engine_in_process=args.engine_in_process,
                       keep_alive_s=args.keep_alive_s))
    return 0


def _config_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", "-c", metavar="FILE",
                    help=f"YAML config (default conf/default.yaml; presets: {', '.join(list_presets())})")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="override any config key, e.g. pretrain.max_steps=100 data.sources=[a,b]")


SHOWN = ["eval/loss", "eval/ppl", "eval/bpb", "eval/baseline_bpb", "eval/mlm_loss", "eval/mlm_accuracy",
         "eval/baseline_mlm_loss", "eval/accuracy", "eval/macro_f1", "eval/baseline_accuracy",
         "eval/tfidf_accuracy", "eval/response_loss", "eval/base_response_loss", "eval/chrf", "eval/baseline_chrf",
         "eval/exact_match", "eval/baseline_exact_match"]
# After the lines above, which print as they did: ROUGE-L, the judge, the team's own evaluation set.
SHOWN += ["eval/rouge_l", "eval/baseline_rouge_l", "eval/judge_win_rate", "eval_set/response_loss",
          "eval_set/base_response_loss", "eval_set/chrf", "eval_set/baseline_chrf", "eval_set/rouge_l",
          "eval_set/baseline_rouge_l", "eval_set/exact_match", "eval_set/baseline_exact_match",
          "eval_set/judge_win_rate"]


def _summary(out: dict, seconds: float, uri: str) -> str:
    lines = ["", f"lmforge: pipeline finished in {seconds / 60:.1f} min"]
    if "evaluate" in out:
        m = json.loads((Path(out["evaluate"]) / "metrics.json").read_text())
        lines += [f"  {k:<26} {m[k]:.4f}" for k in SHOWN if k in m]
    if "deploy" in out:
        d = json.loads((Path(out["deploy"]) / "manifest.json").read_text())
        promoted = "promoted to" if d["metrics"].get("deploy/promoted") else "registered; not better than"
        lines.append(f"  model {d['outputs']['model_uri']} {promoted} {d['outputs']['alias_uri']}")
        if d.get("tags", {}).get("lmforge.decision_reason"):
            lines.append(f"    {d['tags']['lmforge.decision_reason']}")
    from lm.tracking.runs import run_page

    shown = display_uri(uri)
    lines += [
        f"  MLflow parent run: {out['mlflow_run_id']}  (tracking {shown})",
        f"  dashboard: make ui, then {run_page(uri, out['mlflow_run_id'])}",
        f"             (or: mlflow ui --backend-store-uri {shown} --host 127.0.0.1)",
    ]
    return "\n".join(lines)


def schedule_command(args: argparse.Namespace, cfg: Config) -> int:
    """``lmforge schedule``: serve the deployments until stopped."""
    import contextlib

    from flows.deployments import deploy_to_work_pool, local_server, serve_deployments

    server = local_server(cfg.workdir, args.host, args.port) if args.local_server else contextlib.nullcontext()
    with server:
        if args.work_pool:
            ids = deploy_to_work_pool(cfg, args.cron, args.work_pool, args.image, args.name)
            print(f"lmforge: registered {len(ids)} deployments on work pool {args.work_pool!r}; "
                  f"start a worker: prefect worker start --pool {args.work_pool}")
            return 0
        when = f"on cron {args.cron!r}" if args.cron else "without a schedule"
        print(f"lmforge: serving lmforge-pipeline/{args.name} {when}, a deployment per stage, and the new-data "
              f"check every {cfg.retrain.check_every_s} s; Ctrl-C stops")
        serve_deployments(cfg, args.cron, args.name)
    return 0


def _prefect_environment(cfg: Config) -> None:
    # Persisted task results (the cache records) live beside the outputs they point to, so
    # removing the work directory forgets both.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path(cfg.workdir).expanduser().resolve() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS)


def main(argv: list[str] | None = None, table: Sequence[Stage] = STAGES) -> int:
    args = _parser(table).parse_args(argv)
    try:
        if args.command == "generate":
            return generate_command(args)
        if args.command == "serve":
            return serve_command(args)
        if args.command == "trigger":
            from flows.deployments import trigger

            return trigger(args.deployment, args.overrides)
        cfg = load_config(args.config, args.overrides)  # the one parse of this run's config
        if args.command == "config":
            print(cfg.to_yaml(), end="")
            return 0
        if args.command in ("promote", "rollback"):
            return registry_command(args, cfg)
        if args.command == "report":
            return report_command(args, cfg)
        targets = [] if args.command == "schedule" else commands(table)[args.command][0]
        _prefect_environment(cfg)
        from flows.pipeline import build_pipeline, check, pipeline
        from tasks.common import quiet_user_errors

        check(cfg, stages_for(targets, table, cfg))  # seconds, before Prefect starts
        quiet_user_errors()
        if args.command == "schedule":
            return schedule_command(args, cfg)
        t0 = time.monotonic()
        flow_ = pipeline if table is STAGES else build_pipeline(table)
        from flows.ephemeral import temporary_server

        server_log = Path(cfg.workdir).expanduser() / ".prefect" / "temporary-server.log"
        with temporary_server(server_log, float(EPHEMERAL_STARTUP_SECONDS)):
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
