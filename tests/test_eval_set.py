"""Instruction tuning scored on the team's own evaluation set (``eval_set.parquet`` beside the
splits), ROUGE-L beside chrF, and the judged win rate against the model before tuning, with a
real ``lmforge serve`` as the judge."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serve_fixtures import export_model, make_workdir, metric, serving

from lm.config import EvaluateConfig, JudgeConfig, load_config
from lm.data.instruct import EVAL_SET, SCHEMA, read_split, split_path
from lm.errors import ConfigError
from lm.finetune import judge, sft

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_ROUTE = "/v1/chat/completions"


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


TEAM_QUESTIONS = [conversation(f"What is {i} times two?", f"It is {2 * i}.") for i in (30, 31, 32, 33, 34)]


def write_eval_set(data_dir: Path, conversations: list[list[dict]]) -> None:
    """The team's evaluation set as the finetune_data stage writes it: the sft splits' messages column."""
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in conversations], schema=SCHEMA),
                   split_path(data_dir, EVAL_SET))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict[str, Path]:
    return make_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def chat(workdir) -> dict[str, Path]:
    """A tiny untrained chat model exported as the pipeline exports it, the model before tuning beside it."""
    export = export_model(workdir, "chat")
    return {"export": export, "tuned": export.parent / "finetune", "base": export.parent / "pretrain",
            "tokens": workdir["tokens"], "data": workdir["root"] / "sft-data"}


def with_eval_set(chat, tmp_path: Path, conversations=TEAM_QUESTIONS) -> Path:
    data = tmp_path / "data"
    shutil.copytree(chat["data"], data)
    write_eval_set(data, conversations)
    return data


# ---- ROUGE-L ------------------------------------------------------------------------------------------


def test_rouge_l_is_rouge_scores_own_on_english_and_still_counts_words_in_other_scripts():
    from rouge_score.rouge_scorer import RougeScorer

    pairs = [("Return the JSON string.", "Return a JSON formatted string."), ("a b c d", "d c b a"),
             ("Serialize obj_to JSON (a str).", "Serialize ``obj`` to a JSON formatted ``str``."),
             ("It is 4.", "It is 4."), ("", "Split the string.")]
    theirs = RougeScorer(["rougeL"])  # its default tokenizer, no stemming: what papers report
    for hyp, ref in pairs:
        assert sft.rouge_l([hyp], [ref]) == pytest.approx(100 * theirs.score(ref, hyp)["rougeL"].fmeasure)
    # By hand: LCS "return json string" = 3 of 4 and 5 words: F = 2 * 3/4 * 3/5 / (3/4 + 3/5) = 2/3.
    assert sft.rouge_l([pairs[0][0]], [pairs[0][1]]) == pytest.approx(100 * 2 / 3)
    assert sft.rouge_l(["It is 4.", "x"], ["It is 4.", "y"]) == pytest.approx(50.0)  # the mean over pairs
    # rouge_score's own tokenizer keeps only a-z and 0-9, so another script scores 0 there.
    assert theirs.score("Размер файла в байтах", "Размер списка в байтах")["rougeL"].fmeasure == 0
    assert sft.rouge_l(["Размер списка в байтах"], ["Размер файла в байтах"]) == pytest.approx(100 * 3 / 4)
    assert sft.rouge_l(["今天天气很好"], ["今天天气不好"]) == pytest.approx(100 * 5 / 6)  # a character a word


# ---- the team's evaluation set ---------------------------------------------------------------------------


def test_the_team_s_evaluation_set_is_scored_beside_the_test_split_and_only_when_present(chat, tmp_path):
    settings = EvaluateConfig(generate_prompts=3, max_new_tokens=4)
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    plain.mkdir(), scored.mkdir()
    without = sft.evaluate(chat["tuned"], chat["data"], chat["tokens"] / "tokenizer.json", base_dir=chat["base"],
                           out_dir=plain, settings=settings)
    data = with_eval_set(chat, tmp_path)
    assert read_split(data, EVAL_SET) == TEAM_QUESTIONS
    t0 = time.perf_counter()
    both = sft.evaluate(chat["tuned"], data, chat["tokens"] / "tokenizer.json", base_dir=chat["base"],
                        out_dir=scored, settings=settings)
    assert time.perf_counter() - t0 < 20
    assert not any(k.startswith("eval_set/") for k in without) and not (plain / "eval_set_generations.csv").exists()
    assert {k: v for k, v in both.items() if k.startswith("eval/")} == without  # the test split's numbers unchanged
    for name in ("response_loss", "response_ppl", "base_response_loss", "chrf", "baseline_chrf", "rouge_l",
                 "baseline_rouge_l", "exact_match", "baseline_exact_match"):
        assert f"eval_set/{name}" in both and f"eval/{name}" in both, name
    assert both["eval_set/examples"] == 5 and both["eval_set/generated_examples"] == 3
    assert {"eval/test_examples", "eval/truncated_test_examples", "eval/rouge_l", "eval/baseline_rouge_l"} <= set(both)
    # The baseline answers the team's questions with the training answer of the most similar prompt.
    table = pd.read_csv(scored / "eval_set_generations.csv")
    assert table["reference"].tolist() == ["It is 60.", "It is 62.", "It is 64."]
    assert table["baseline_response"].str.fullmatch(r"It is \d+\.").all()
    assert both["eval_set/baseline_rouge_l"] == pytest.approx(sft.rouge_l(table["baseline_response"].tolist(),
                                                                           table["reference"].tolist()))
    assert list(table.columns) == ["prompt", "reference", "response", "baseline_response", "chrf", "rouge_l"]


@pytest.mark.slow  # 10-20 s: the evaluate stage twice and a new MLflow store
def test_the_evaluate_stage_logs_the_eval_set_metrics_table_and_dataset(chat, tmp_path):
    from mlflow import MlflowClient

    from lm.pipeline.evaluate import evaluate
    from lm.tracking.runs import log_stage_result, start_pipeline_run, start_stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", [f"tracking.uri={uri}", "finetune.task=sft", "evaluate.max_batches=1",
                               "evaluate.generate_prompts=2", "evaluate.max_new_tokens=4"])
    parent = start_pipeline_run(cfg)
    logged = {}
    for name, data in (("without", chat["data"]), ("with", with_eval_set(chat, tmp_path))):
        out = tmp_path / name
        out.mkdir()
        result = evaluate(cfg, chat["base"], chat["tuned"], chat["tokens"], data, out_dir=out)
        run_id = start_stage_run(uri, parent, "evaluate", {})
        log_stage_result(uri, run_id, out, result, {}, cached=False)
        run = MlflowClient(uri).get_run(run_id)
        artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
        logged[name] = (run.data.metrics, artifacts, {d.dataset.name for d in run.inputs.dataset_inputs})
    metrics, artifacts, datasets = logged["with"]
    assert {"eval_set/chrf", "eval_set/rouge_l", "eval_set/exact_match", "eval_set/baseline_rouge_l"} <= set(metrics)
    assert {"eval_set_generations.csv", "eval_set_generations.json"} <= artifacts
    assert datasets == {"heldout_tokens", "test", EVAL_SET}
    metrics, artifacts, datasets = logged["without"]
    assert "eval/rouge_l" in metrics and not any(k.startswith("eval_set/") for k in metrics)
    assert not any(a.startswith("eval_set_generations") for a in artifacts) and EVAL_SET not in datasets


def test_the_evaluation_set_digest_follows_the_team_s_questions_and_not_the_judge(chat, tmp_path):
    from lm.pipeline.evaluate import evaluation_set_digests

    cfg = load_config("tiny", ["finetune.task=sft", "deploy.promote_metric=eval/chrf"])
    data = tmp_path / "data"
    shutil.copytree(chat["data"], data)

    def digests(config=cfg) -> dict[str, str]:
        return evaluation_set_digests(config, data, chat["tokens"])

    before = digests()
    write_eval_set(data, TEAM_QUESTIONS)
    first = digests()
    write_eval_set(data, [*TEAM_QUESTIONS[:-1], conversation("What is 34 times two?", "68.")])
    second = digests()
    assert len({before["method"], first["method"], second["method"]}) == 3
    assert before["language_model"] == first["language_model"] == second["language_model"]
    split_path(data, EVAL_SET).unlink()
    assert digests() == before
    judged = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"judge": JudgeConfig(url="http://127.0.0.1:9/v1", model="judge", max_pairs=3)})})
    assert digests(judged) == before  # the judge picks nothing from the held-out data


def test_a_champion_rescored_on_this_run_s_data_is_scored_on_the_team_s_questions_and_not_judged(chat, tmp_path):
    from lm.pipeline.evaluate import rescore

    # A judge URL nothing answers at: asking it would stop the rescoring.
    cfg = load_config("tiny", ["finetune.task=sft", "evaluate.max_batches=1", "evaluate.generate_prompts=2",
                               "evaluate.max_new_tokens=4", "evaluate.judge.url=http://127.0.0.1:9/v1",
                               "evaluate.judge.model=judge", "deploy.promote_metric=eval/chrf"])
    (tmp_path / "scratch").mkdir()
    metrics = rescore(cfg, chat["export"], with_eval_set(chat, tmp_path), chat["tokens"], out_dir=tmp_path / "scratch")
    assert {"eval/chrf", "eval/rouge_l", "eval_set/chrf", "eval_set/rouge_l"} <= set(metrics)
    assert not any("judge" in k for k in metrics)


def test_the_pipeline_run_shows_the_team_s_evaluation_set_beside_its_baselines():
    from lm.tracking.report import StageRun, parent_metrics, summary_markdown

    ev = {"eval/chrf": 40.0, "eval/baseline_chrf": 30.0, "eval/rouge_l": 45.0, "eval/baseline_rouge_l": 20.0,
          "eval_set/chrf": 35.0, "eval_set/baseline_chrf": 20.0, "eval_set/judge_win_rate": 0.75}
    stages = {"evaluate": StageRun(metrics=ev)}
    assert set(ev) <= set(parent_metrics(stages, 60.0))  # the run list compares them run by run
    note = summary_markdown(run_name="demo-1", config="demo", targets="all", commit=None, seconds=60.0,
                            stages=stages, champion=None, model_version=None, model_link=None)
    assert "| `eval/rouge_l` | 45.0000 | - | 20.0000 nearest training answer |" in note
    assert "| `eval_set/chrf` | 35.0000 | - | 20.0000 nearest training answer |" in note
    assert "| `eval_set/judge_win_rate` | 0.7500 | - | - |" in note


# ---- the judge ---------------------------------------------------------------------------------------------


def test_a_pair_is_won_only_when_both_orders_agree():
    assert judge.verdict("A is clearer.\n[[A]]") == "A" and judge.verdict("[[ b ]]") == "B"
    assert judge.verdict("first [[A]], on reflection [[tie]]") == "tie"  # the last verdict counts
    assert judge.verdict("A is better") is None and judge.verdict(None) is None
    # (verdict with the tuned answer as A, verdict with it as B) -> the tuned model's outcome
    assert judge.pair_outcome("A", "B") == "win" and judge.pair_outcome("B", "A") == "loss"
    assert judge.pair_outcome("A", "A") == "tie"  # a judge that always picks the first answer decides nothing
    assert judge.pair_outcome("B", "B") == "tie" and judge.pair_outcome("tie", "B") == "tie"
    assert judge.pair_outcome("A", None) == "parse_failure" == judge.pair_outcome(None, "B")
    counts = judge.judge_metrics(["win", "win", "loss", "tie", "parse_failure"])
    assert counts == {"judge_pairs": 5, "judge_wins": 2, "judge_losses": 1, "judge_ties": 1,
                      "judge_parse_failures": 1, "judge_win_rate": (2 + 0.5) / 4}
    assert "judge_win_rate" not in judge.judge_metrics(["parse_failure"])


@pytest.mark.slow  # ~5 s: an lmforge serve started and asked 2 x 4 questions of ~200 tokens
def test_the_judge_is_asked_both_orders_of_every_pair_and_every_pair_is_counted(chat, tmp_path):
    with serving(chat["export"], served_model_name="judge", max_new_tokens=64) as server:
        settings = EvaluateConfig(generate_prompts=4, max_new_tokens=4, judge=JudgeConfig(
            url=f"{server.url}/v1", model="judge", max_pairs=3, max_tokens=12, timeout_s=60))
        data = with_eval_set(chat, tmp_path)  # 5 questions, 4 answered, 3 judged
        (tmp_path / "out").mkdir()
        metrics = sft.evaluate(chat["tuned"], data, chat["tokens"] / "tokenizer.json", base_dir=chat["base"],
                               out_dir=tmp_path / "out", settings=settings)
        asked = metric(server, "lmforge_requests_total")
        wrong_model = settings.judge.model_copy(update={"model": "someone-else"})
        with pytest.raises(ConfigError, match=r"refused the request \(HTTP 404: .*check evaluate.judge.model"):
            judge.judge_pairs(wrong_model, ["q?"], ["r."], ["a."], ["b."])
    test_pairs = min(3, len(read_split(data, "test")))
    assert metrics["eval/judge_pairs"] == test_pairs >= 1 and metrics["eval_set/judge_pairs"] == 3
    chat_requests = sum(v for k, v in asked.items() if ("route", CHAT_ROUTE) in k and ("status", "200") in k)
    assert chat_requests == 2 * (test_pairs + 3), asked  # both orders of every pair
    assert sum(v for k, v in asked.items() if ("route", CHAT_ROUTE) in k) == chat_requests  # none refused
    for prefix in ("eval", "eval_set"):
        counts = [metrics[f"{prefix}/judge_{k}"] for k in ("wins", "losses", "ties", "parse_failures")]
        assert sum(counts) == metrics[f"{prefix}/judge_pairs"], metrics
    table = pd.read_csv(tmp_path / "out" / "eval_set_generations.csv", keep_default_na=False)
    assert len(table) == 4 and table["judge"].tolist()[3] == "" and table["base_response"].tolist()[3] == ""
    outcomes = table["judge"][:3]
    assert set(outcomes) <= set(judge.OUTCOMES)
    for outcome, name in (("win", "wins"), ("loss", "losses"), ("tie", "ties"), ("parse_failure", "parse_failures")):
        assert (outcomes == outcome).sum() == metrics[f"eval_set/judge_{name}"]
    print({k: v for k, v in metrics.items() if "judge" in k})  # what a random judge said (-s shows it)


def test_a_judge_that_does_not_answer_stops_the_evaluation_naming_its_url(chat, tmp_path):
    with socket.socket() as s:  # a free port with nothing behind it
        s.bind(("127.0.0.1", 0))
        refused = s.getsockname()[1]
    with socket.socket() as silent:  # takes connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for port, message in ((refused, "does not answer"), (silent.getsockname()[1], "did not answer within")):
            settings = JudgeConfig(url=f"http://127.0.0.1:{port}/v1", model="judge", timeout_s=0.5)
            with pytest.raises(ConfigError) as error:
                judge.judge_pairs(settings, ["q?"], ["r."], ["a."], ["b."])
            text = str(error.value)
            assert f"evaluate.judge.url=http://127.0.0.1:{port}/v1 {message}" in text and "\n" not in text, text


def test_the_judge_s_config_is_checked_when_it_is_read(monkeypatch):
    assert load_config("tiny").evaluate.judge.url is None  # off unless asked for
    with pytest.raises(ConfigError, match=r"evaluate.judge.url is set: name the judge model"):
        load_config("tiny", ["evaluate.judge.url=http://127.0.0.1:8000/v1"])
    with pytest.raises(ConfigError, match=r"key 'evaluate.judge.prompt'.*must contain \{answer_b\}"):
        load_config("tiny", ["evaluate.judge.prompt='Which is better, {answer_a} or this? {question}'"])
    with pytest.raises(ConfigError, match=r"unknown fields \['context'\]"):
        load_config("tiny", ["evaluate.judge.prompt='{context} {question} {answer_a} {answer_b}'"])
    monkeypatch.delenv("LMFORGE_TEST_JUDGE_KEY", raising=False)
    settings = JudgeConfig(url="http://127.0.0.1:9/v1", model="judge", api_key_env="LMFORGE_TEST_JUDGE_KEY")
    with pytest.raises(ConfigError, match=r"api_key_env=LMFORGE_TEST_JUDGE_KEY, but that environment variable is not set"):
        judge.judge_pairs(settings, ["q?"], ["r."], ["a."], ["b."])
