"""What a reviewer reads first: the pipeline run's key numbers, its markdown summary, and the
comparison table of recent runs (``lmforge report``).

Plain data in, numbers and text out: the MLflow side is ``lm.tracking.summary``'s (reading the run
tree, writing the parent run) and ``lm.tracking.runs``'s (listing pipeline runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lm.tracking.registry import DECISION_TAG, PROMOTE_METRIC_TAG, REASON_TAG

# Each headline metric of the evaluate stage beside the baselines measured with it (same data).
BASELINES: dict[str, list[tuple[str, str]]] = {
    "eval/accuracy": [("eval/baseline_accuracy", "majority class"), ("eval/tfidf_accuracy", "TF-IDF + logistic regression")],
    "eval/macro_f1": [("eval/baseline_macro_f1", "majority class"), ("eval/tfidf_macro_f1", "TF-IDF + logistic regression")],
    "eval/chrf": [("eval/baseline_chrf", "nearest training answer")],
    "eval/exact_match": [("eval/baseline_exact_match", "nearest training answer")],
    "eval/response_loss": [("eval/base_response_loss", "the model before tuning")],
    "eval/bpb": [("eval/baseline_bpb", "unigram")],
    "eval/mlm_loss": [("eval/baseline_mlm_loss", "unigram")],
    "eval/mlm_accuracy": [],
    "eval/loss": [],
    "eval/rouge_l": [("eval/baseline_rouge_l", "nearest training answer")],
    "eval/judge_win_rate": [],  # over the model before tuning: 0.5 is as good as it
    # The team's own evaluation set (evaluate.data), when the run had one.
    "eval_set/chrf": [("eval_set/baseline_chrf", "nearest training answer")],
    "eval_set/rouge_l": [("eval_set/baseline_rouge_l", "nearest training answer")],
    "eval_set/exact_match": [("eval_set/baseline_exact_match", "nearest training answer")],
    "eval_set/response_loss": [("eval_set/base_response_loss", "the model before tuning")],
    "eval_set/judge_win_rate": [],
}
EVALUATION = ("eval/", "eval_set/")  # the evaluate stage's metrics: the test split's, the team's evaluation set's

# Stage metrics the parent run repeats (as parent name <- stage, child metric), so that the run list
# compares pipeline runs column by column. The evaluate stage's eval/* and eval_set/* metrics come too, all of them.
FROM_STAGES: dict[str, tuple[str, str]] = {
    "deploy/version": ("deploy", "deploy/version"),
    "deploy/promoted": ("deploy", "deploy/promoted"),
    "deploy/new_value": ("deploy", "deploy/new_value"),
    "deploy/champion_value": ("deploy", "deploy/champion_value"),
    "ingest/documents": ("ingest", "ingest/documents"),
    "ingest/bytes": ("ingest", "ingest/bytes"),
    "clean/docs_in": ("clean", "clean/docs_in"),
    "clean/docs_out": ("clean", "clean/docs_out"),
    "clean/bytes_out": ("clean", "clean/bytes_out"),
    "clean/train_docs": ("clean", "clean/train_docs"),
    "clean/val_docs": ("clean", "clean/val_docs"),
    "tokenize/train_tokens": ("tokenize", "tokenize/train_tokens"),
    "tokenize/val_tokens": ("tokenize", "tokenize/val_tokens"),
    "finetune_data/train": ("finetune_data", "finetune_data/train"),
    "finetune_data/test": ("finetune_data", "finetune_data/test"),
    "pretrain/val_loss": ("pretrain", "val/loss"),
    "finetune/val_loss": ("finetune", "val/loss"),
}
DURATION = "pipeline/seconds"
# The parent's tags repeating its deploy stage (beside the registry's: the decision, its reason, the metric).
MODEL_VERSION_TAG = "lmforge.model_version"  # models:/<name>/<version> this pipeline run registered


@dataclass
class StageRun:
    """One stage's child run, as the summary needs it."""

    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None


@dataclass
class Champion:
    """The version that held the alias when this run's deploy decided, with its registered metrics."""

    version: str
    metrics: dict[str, float]
    same_set: bool  # measured on the evaluation set this run's promotion metric was measured on


def parent_metrics(stages: Mapping[str, StageRun], seconds: float) -> dict[str, float]:
    """The key metrics of a pipeline run, from its stages' child runs."""
    # The evaluation first: the UI lists a run's metrics in the order they were logged.
    out = {k: v for k, v in sorted(stages["evaluate"].metrics.items()) if k.startswith(EVALUATION)} if "evaluate" in stages else {}
    out.update({name: stages[stage].metrics[key] for name, (stage, key) in FROM_STAGES.items()
                if stage in stages and key in stages[stage].metrics})
    out[DURATION] = seconds
    return out


def parent_tags(deploy: StageRun, model_version: str) -> dict[str, str]:
    """The tags a pipeline run repeats from its deploy stage, that the run list reads: the version it
    registered, the metric that decided, the decision and its reason."""
    tags = {MODEL_VERSION_TAG: model_version, PROMOTE_METRIC_TAG: deploy.params["deploy.promote_metric"]}
    tags.update({k: v for k, v in deploy.tags.items() if k in (DECISION_TAG, REASON_TAG)})
    return tags


def headline(metrics: Mapping[str, float], promote_metric: str | None) -> list[str]:
    """The metrics a person compares first: the promotion metric, then each one that has a baseline."""
    names = [promote_metric] if promote_metric in metrics else []
    return names + [m for m in BASELINES if m in metrics and m not in names]


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def _size(n: float | None, unit: str = "") -> str:
    """6867560 -> '6.9 M' + unit; a missing number -> '-'."""
    if n is None:
        return "-"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {prefix}{unit}"
    return f"{int(n)} {unit}".rstrip()


def summary_markdown(
    *,
    run_name: str,
    config: str,
    targets: str,
    commit: str | None,
    seconds: float,
    stages: Mapping[str, StageRun],
    champion: Champion | None,
    model_version: str | None,
    model_link: str | None,
    figures: Sequence[tuple[str, str]] = (),
) -> str:
    """The parent run's description (``mlflow.note.content``): data in and out, the key metrics
    beside the champion and the baselines, the promotion decision and its reason; ``figures``: (caption,
    image URL) shown at its end."""
    deploy = stages.get("deploy")
    promote_metric = deploy.params.get("deploy.promote_metric") if deploy else None
    # The UI shows a description's first lines until "Show more": the decision and its numbers first.
    lines = [] if deploy is None else _decision(deploy, promote_metric, champion, model_version, model_link)
    lines += [f"Pipeline run `{run_name}`: config `{config}`, stages: {targets}, {seconds / 60:.1f} min"
              + (f", git `{commit[:10]}`" if commit else "") + ".", ""]
    if "evaluate" in stages and stages["evaluate"].metrics:
        lines += _key_metrics(stages["evaluate"].metrics, deploy, promote_metric, champion)
    lines += _data(stages)
    lines += _stage_table(stages)
    lines += _pictures(figures)
    return "\n".join(lines) + "\n"


def _decision(
    deploy: StageRun, promote_metric: str | None, champion: Champion | None, model_version: str | None,
    model_link: str | None,
) -> list[str]:
    """The verdict with its numbers, then deploy's reason as a quote."""
    decision = deploy.tags.get(DECISION_TAG, "?")
    alias = deploy.params.get("deploy.alias", "champion")
    model = f"[{model_version}]({model_link})" if model_version and model_link else f"`{model_version}`"
    new, old = deploy.metrics.get("deploy/new_value"), deploy.metrics.get("deploy/champion_value")
    numbers = ""
    if promote_metric:
        numbers = f": `{promote_metric}` {_num(new)}"
        if old is not None and champion is not None:
            numbers += f" against {_num(old)} for champion v{champion.version}"
    if decision == "promoted":
        verdict = f"**Promoted** {model} to `@{alias}`"
    else:
        stays = f" (`@{alias}` stays on v{champion.version})" if champion is not None else ""
        verdict = f"**Kept** {model} as challenger{stays}"
    return [f"{verdict}{numbers}.", "",
            # \@: the UI's markdown would turn "@champion" into a link to a GitHub user
            "> " + deploy.tags.get(REASON_TAG, "(no reason recorded)").replace("@", "\\@"), ""]


def _key_metrics(
    ev: Mapping[str, float], deploy: StageRun | None, promote_metric: str | None, champion: Champion | None
) -> list[str]:
    """### Key metrics: each headline metric beside the champion's and the baselines measured with it."""
    champ_head = f"champion v{champion.version}" if champion else "champion"
    lines = ["### Key metrics", "", f"| metric | this run | {champ_head} | baselines (same data) |",
             "|---|---:|---:|---|"]
    for name in headline(ev, promote_metric):
        mark = " (promotion)" if name == promote_metric else ""
        theirs = None
        if champion is not None:
            theirs = (deploy.metrics.get("deploy/champion_value") if name == promote_metric and deploy
                      else champion.metrics.get(name))
        baselines = ", ".join(f"{_num(ev[b])} {label}" for b, label in BASELINES.get(name, []) if b in ev)
        lines.append(f"| `{name}`{mark} | {_num(ev[name])} | {_num(theirs)} | {baselines or '-'} |")
    lines.append("")
    if champion is None:
        lines += ["No version held the alias before this run: there is no champion to compare with.", ""]
    elif not champion.same_set:
        lines += ["The champion's numbers other than the promotion metric were measured on its own "
                  "evaluation set, not this run's.", ""]
    return lines


def _data(stages: Mapping[str, StageRun]) -> list[str]:
    """### Data: documents ingested, dropped (by filter, as duplicates) and kept; tokens; examples."""
    rows = []
    if "ingest" in stages:
        m = stages["ingest"].metrics
        rows.append(f"| ingested | {_count(m.get('ingest/documents'))} documents | {_size(m.get('ingest/bytes'), 'B')} |")
    if "clean" in stages:
        rows += _clean_rows(stages["clean"].metrics)
    if "tokenize" in stages:
        m = stages["tokenize"].metrics
        rows.append(f"| tokens | {_size(m.get('tokenize/train_tokens'))} train | "
                    f"{_size(m.get('tokenize/val_tokens'))} validation |")
    if "finetune_data" in stages:
        m = stages["finetune_data"].metrics
        rows.append(f"| fine-tuning examples | {_count(m.get('finetune_data/train'))} train | "
                    f"validation {_count(m.get('finetune_data/val'))}, test {_count(m.get('finetune_data/test'))} |")
    return ["### Data", "", "| | count | detail |", "|---|---:|---|", *rows, ""] if rows else []


def _clean_rows(m: Mapping[str, float]) -> list[str]:
    dropped = sorted(((k.removeprefix("clean/dropped/"), v) for k, v in m.items()
                      if k.startswith("clean/dropped/") and v), key=lambda kv: -kv[1])
    dups = m.get("dedup/exact_dups", 0) + m.get("dedup/near_dups", 0)
    reasons = ", ".join(f"{r} {_count(v)}" for r, v in dropped) or "none"
    return [
        f"| dropped by the filters | {_count(m.get('clean/docs_filtered', 0))} documents | {reasons} |",
        f"| dropped as duplicates | {_count(dups)} documents | exact {_count(m.get('dedup/exact_dups', 0))}, "
        f"near {_count(m.get('dedup/near_dups', 0))} |",
        f"| kept | {_count(m.get('clean/docs_out'))} documents | {_size(m.get('clean/bytes_out'), 'B')}; "
        f"train {_count(m.get('clean/train_docs'))}, validation {_count(m.get('clean/val_docs'))} |",
    ]


def _stage_table(stages: Mapping[str, StageRun]) -> list[str]:
    """### Stages: each stage, whether it ran or was reused from the cache, and its seconds."""
    lines = ["### Stages", "", "| stage | | seconds |", "|---|---|---:|"]
    for name, st in stages.items():
        state = "cached" if st.tags.get("lmforge.cached") == "true" else "ran"
        lines.append(f"| {name} | {state} | {_num(st.seconds, 1) if st.seconds is not None else '-'} |")
    return lines


def _pictures(figures: Sequence[tuple[str, str]]) -> list[str]:
    if not figures:
        return []
    return ["", "### Pictures", "", "Each is an artifact of the stage that drew it (its child run, Artifacts tab); "
            "a generative model's answers are the evaluate stage's generations table.", "",
            *(f"![{caption}]({url})" for caption, url in figures)]


# ---- lmforge report --------------------------------------------------------------------------------

STATUS = {"FINISHED": "ok", "FAILED": "failed", "RUNNING": "running", "KILLED": "killed", "SCHEDULED": "scheduled"}


def comparison_table(runs: Sequence[Mapping[str, Any]], width: int = 100) -> str:
    """One row per pipeline run, newest first: name, trigger, documents kept, the run's promotion metric
    with its value and the champion's, other headline metrics while they fit in ``width`` columns,
    decision, the version registered, minutes, status. Runs of different tasks can share an
    experiment: each row names the metric it was promoted by.
    ``runs``: dicts with name, start and end (ms; end None while running), status, metrics, tags."""
    if not runs:
        return "no pipeline runs yet"
    others: list[str] = []  # headline metrics beyond each run's own promotion metric
    for r in runs:
        own = r["tags"].get(PROMOTE_METRIC_TAG)
        others += [m for m in headline(r["metrics"], None) if m != own and m not in others]

    def short(metric: str) -> str:
        return metric.removeprefix("eval/")

    rows = []
    for r in runs:
        m, tags = r["metrics"], r["tags"]
        seconds = m.get(DURATION)
        if seconds is None and r.get("end"):
            seconds = (r["end"] - r["start"]) / 1000
        version = tags.get(MODEL_VERSION_TAG, "")
        own = tags.get(PROMOTE_METRIC_TAG)
        rows.append({
            "run": r["name"],  # it carries its start time (config-YYYYmmdd-HHMMSS)
            "trigger": tags.get("lmforge.trigger", "-"),
            "docs": _count(m.get("clean/docs_out")),
            "metric": short(own) if own else "-",  # the one it was promoted by
            "value": _num(m.get(own)) if own else "-",
            "champion": _num(m.get("deploy/champion_value")),
            **{short(k): _num(m.get(k)) for k in others},
            "decision": tags.get(DECISION_TAG, "-"),
            "ver": f"v{version.rsplit('/', 1)[-1]}" if version else "-",  # the registered version
            "min": f"{seconds / 60:.1f}" if seconds is not None else "-",
            "status": STATUS.get(r["status"], r["status"].lower()),
        })
    columns = ["run", "trigger", "docs", "metric", "value", "champion"]
    tail = ["decision", "ver", "min", "status"]
    for metric in others:  # while they fit
        if max(map(len, _render(rows, [*columns, short(metric), *tail]).splitlines())) <= width:
            columns.append(short(metric))
    return _render(rows, columns + tail)


def _render(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    left = {"run", "trigger", "metric", "decision", "status"}

    def line(cells: Mapping[str, str]) -> str:
        return "  ".join(cells[c].ljust(widths[c]) if c in left else cells[c].rjust(widths[c]) for c in columns).rstrip()

    return "\n".join([line({c: c for c in columns}), *(line(r) for r in rows)])
