"""A judged win rate: the tuned model's answers against the model's before tuning, compared by
another model behind any OpenAI-compatible chat completions endpoint (``evaluate.judge``).

A judge prefers whichever answer it reads first (or second) more often than the answers deserve
(Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena", section 3.3). So
every pair is asked twice, the tuned answer once as A and once as B: it wins only if both
verdicts prefer it, loses only if both prefer the other; a tie in either order, or two verdicts
that disagree, is a tie. A reply without a verdict (``[[A]]``, ``[[B]]`` or ``[[tie]]``; the last
one counts) makes its pair a parse failure, left out of the win rate. The win rate counts a tie
as half a win, over the pairs judged.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai

from lm.config import JudgeConfig
from lm.errors import ConfigError

VERDICT = re.compile(r"\[\[\s*(a|b|tie)\s*\]\]", re.IGNORECASE)
OUTCOMES = ("win", "loss", "tie", "parse_failure")  # a pair's, for the tuned model
# What to do when the endpoint refuses, by HTTP status.
REFUSED = {401: "put a valid key in the variable evaluate.judge.api_key_env names",
           403: "put a valid key in the variable evaluate.judge.api_key_env names",
           404: "check evaluate.judge.model and the URL (it ends in /v1 for most servers)"}
CONCURRENT_REQUESTS = 8  # an endpoint answers several at once; more would only queue there


def verdict(reply: str | None) -> str | None:
    """The judge's last verdict in a reply: "A", "B", "tie", or None when it gave none."""
    found = VERDICT.findall(reply or "")
    if not found:
        return None
    return "tie" if found[-1].lower() == "tie" else found[-1].upper()


def pair_outcome(tuned_first: str | None, tuned_second: str | None) -> str:
    """A pair's outcome for the tuned model from the two verdicts: with the tuned answer as A, then as B."""
    if tuned_first is None or tuned_second is None:
        return "parse_failure"
    first = {"A": "tuned", "B": "base", "tie": "tie"}[tuned_first]
    second = {"A": "base", "B": "tuned", "tie": "tie"}[tuned_second]
    if first == second == "tuned":
        return "win"
    if first == second == "base":
        return "loss"
    return "tie"


def judge_metrics(outcomes: list[str]) -> dict[str, float]:
    """judge_pairs, judge_wins, judge_losses, judge_ties, judge_parse_failures and, when a pair was
    judged, judge_win_rate = (wins + ties / 2) / pairs judged."""
    n = Counter(outcomes)
    out = {"judge_pairs": float(len(outcomes)), "judge_wins": float(n["win"]), "judge_losses": float(n["loss"]),
           "judge_ties": float(n["tie"]), "judge_parse_failures": float(n["parse_failure"])}
    judged = len(outcomes) - n["parse_failure"]
    if judged:
        out["judge_win_rate"] = (n["win"] + n["tie"] / 2) / judged
    return out


def _client(settings: JudgeConfig) -> openai.OpenAI:
    key = None
    if settings.api_key_env:
        key = os.environ.get(settings.api_key_env)
        if not key:
            raise ConfigError(
                f"evaluate.judge.api_key_env={settings.api_key_env}, but that environment variable is not set: "
                "export the judge's API key in it"
            )
    # max_retries: a dropped connection is tried again once; the time-out bounds every try.
    return openai.OpenAI(base_url=settings.url, api_key=key or "unused", timeout=settings.timeout_s, max_retries=1)


def _ask(client: openai.OpenAI, settings: JudgeConfig, prompt: str) -> str | None:
    """The judge's reply to one prompt; a one-line ConfigError naming the URL when it gives none."""
    try:
        reply = client.chat.completions.create(
            model=settings.model, messages=[{"role": "user", "content": prompt}],
            temperature=0, max_tokens=settings.max_tokens,
        )
    except openai.APITimeoutError:
        raise ConfigError(
            f"evaluate.judge.url={settings.url} did not answer within evaluate.judge.timeout_s={settings.timeout_s:g} s: "
            "check the judge's server, raise the time-out, or unset evaluate.judge.url"
        ) from None
    except openai.APIConnectionError as e:
        raise ConfigError(
            f"evaluate.judge.url={settings.url} does not answer ({e.__cause__ or e}): start the judge's server, "
            "check the URL, or unset evaluate.judge.url"
        ) from None
    except openai.APIStatusError as e:
        said = re.sub(r"^Error code: \d+ - ", "", " ".join(str(e.message).split()))
        raise ConfigError(
            f"evaluate.judge.url={settings.url} refused the request (HTTP {e.status_code}: {said}): "
            + REFUSED.get(e.status_code, "fix what it says, or unset evaluate.judge.url")
        ) from None
    return reply.choices[0].message.content if reply.choices else None


def judge_pairs(
    settings: JudgeConfig, questions: list[str], references: list[str], tuned: list[str], base: list[str]
) -> list[str]:
    """Each pair's outcome for the tuned model (one of :data:`OUTCOMES`), both orders asked."""
    client = _client(settings)
    prompts = []
    for q, r, t, b in zip(questions, references, tuned, base, strict=True):
        prompts.append(settings.prompt.format(question=q, reference=r, answer_a=t, answer_b=b))
        prompts.append(settings.prompt.format(question=q, reference=r, answer_a=b, answer_b=t))
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        verdicts = [verdict(reply) for reply in pool.map(lambda p: _ask(client, settings, p), prompts)]
    return [pair_outcome(verdicts[i], verdicts[i + 1]) for i in range(0, len(verdicts), 2)]
