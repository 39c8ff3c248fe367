"""``lmforge serve``: real uvicorn servers on 127.0.0.1 called with the real ``openai`` client and
httpx: chat, completion, streaming, classify, every limit, the API key, batching, and a registry
alias moved while a stream runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serve_fixtures import CONTEXT, HELLO, KEY, client, export_model, make_workdir, metric, register, serving
from train_fixtures import ROOT, child_env

from lm.serving.engine import TextStream
from lm.serving.server import Server

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict[str, Path]:
    return make_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def chat_model(workdir) -> Path:
    return export_model(workdir, "chat")


@pytest.fixture(scope="module")
def server(chat_model) -> Iterator[Server]:
    with serving(chat_model, api_key=KEY, served_model_name="tiny-chat", max_new_tokens=CONTEXT) as s:
        yield s


# ---- the OpenAI API ---------------------------------------------------------------------------------


def test_chat_answers_with_the_models_own_greedy_tokens(server, chat_model):
    from lm.finetune.sft import Predictor
    from lm.generation.sampling import SamplingParams, generate

    reply = client(server).chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=12, temperature=0)
    predictor = Predictor(chat_model)
    prompt = predictor.fmt.encode(HELLO, add_generation_prompt=True)[0]
    [expected] = generate(predictor.model, [prompt], SamplingParams(max_new_tokens=12, temperature=0),
                          eos_ids=predictor.stop_ids, tokenizer=predictor.fmt.tokenizer)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == len(prompt) + expected.completion_tokens
    assert reply.model == "tiny-chat" and reply.id.startswith("chatcmpl-") and reply.created > 0


def test_completion_and_its_stream_give_the_same_text(server):
    api = client(server)
    whole = api.completions.create(model="tiny-chat", prompt="def parse(", max_tokens=24, temperature=0)
    chunks = list(api.completions.create(model="tiny-chat", prompt="def parse(", max_tokens=24, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text == text and len(text) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert all(c.id == chunks[0].id for c in chunks)


def test_chat_stream_assembles_to_the_non_streaming_answer_and_ends_with_done(server):
    api = client(server)
    whole = api.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=30, temperature=0)
    chunks = list(api.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=30, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": HELLO, "max_tokens": 5, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(server):
    api = client(server)
    free = api.completions.create(model="tiny-chat", prompt="import os", max_tokens=40, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    cut = text[: text.find(stop)]
    whole = api.completions.create(model="tiny-chat", prompt="import os", max_tokens=40, temperature=0, stop=[stop])
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="tiny-chat", prompt="import os", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert whole.choices[0].text == streamed == cut and whole.choices[0].finish_reason == "stop"


def test_a_seeded_sample_repeats_whatever_it_is_batched_with(server):
    api = client(server)

    def sample(seed: int) -> str:
        return api.completions.create(model="tiny-chat", prompt="class ", max_tokens=16, temperature=1.0,
                                      seed=seed).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(sample, [7, 7, 8, 7]))
    assert texts[0] == texts[1] == texts[3] and texts[2] != texts[0]


def test_streamed_pieces_never_split_a_character_nor_show_a_stop_string(workdir):
    from lm.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(workdir["tokens"] / "tokenizer.json")
    text = "naïve café — 日本語 🙂 done"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens here
    stream = TextStream(tokenizer)
    pieces = [stream.push(ids[: n + 1]) for n in range(len(ids))]
    assert "".join(pieces) + stream.finish(text) == text
    assert not any("\ufffd" in p for p in pieces)
    held = TextStream(tokenizer, hold=4)  # the longest stop string is 5 characters
    shown = "".join(held.push(ids[: n + 1]) for n in range(len(ids)))
    assert text.startswith(shown) and len(shown) <= len(text) - 4
    assert shown + held.finish(text) == text


def test_models_lists_the_served_model_and_health_needs_no_key(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    card = models[0].model_dump()
    assert card["version"] is None and card["served_as"] == "tiny-chat" and card["max_model_len"] == CONTEXT
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": "tiny-chat"}


def test_an_idle_connection_is_kept_open_longer_than_clients_keep_theirs(server):
    """httpx (and so the openai client) drops a pooled connection idle for 5 s. Were the server to close
    one at about that age, a request sent on it just then would meet a reset connection (it did, once
    in ~10,000 requests of the load test, with uvicorn's default keep-alive of 5 s)."""

    def health(sock: socket.socket) -> bytes:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the connection; it had sent {answer!r}"
            answer += chunk
        return answer

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert health(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        assert health(sock).startswith(b"HTTP/1.1 200")


def test_a_wrong_or_missing_api_key_is_401_on_every_route_but_health(server):
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="sk-wrong").chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/nope"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"messages": [{"role": "user", "content": "hi"}', 400, None),  # not JSON
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": HELLO, "max_tokens": "8"}, 400, "max_tokens"),
        ({"messages": HELLO, "stream": "yes"}, 400, "stream"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": HELLO, "n": 2}, 400, "n"),
        ({"messages": HELLO, "temperature": 3}, 400, "temperature"),
        ({"messages": HELLO, "model": "gpt-4o"}, 404, "model"),
    ],
    ids=["not-json", "messages-not-a-list", "max-tokens-a-string", "stream-a-string", "unknown-role", "n-2",
         "temperature-3", "unknown-model"],
)
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_concurrent_requests_are_decoded_together_each_as_if_alone(server):
    def ask(i: int) -> tuple[str, int]:
        reply = client(server).completions.create(model="tiny-chat", prompt=f"x = {i} * {i}" * (i % 3 + 1),
                                                  max_tokens=32 + i, temperature=0)
        return reply.choices[0].text, reply.usage.completion_tokens

    alone = [ask(i) for i in range(8)]
    before = metric(server, "lmforge_batch_size_bucket")
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    after = metric(server, "lmforge_batch_size_bucket")
    assert together == alone and [n for _, n in alone] == [32 + i for i in range(8)]
    steps = {dict(k[1:])["le"]: after[k] - before.get(k, 0) for k in after}
    assert steps["+Inf"] > steps["1.0"], "no decode step held more than one request"
    assert steps["+Inf"] < sum(n for _, n in alone)  # fewer steps than one request at a time takes
    tokens = metric(server, "lmforge_generated_tokens_total")
    assert tokens[("lmforge_generated_tokens_total", ("version", "local"))] >= 2 * sum(n for _, n in alone)


# ---- classifiers ------------------------------------------------------------------------------------


def test_a_classifier_labels_texts_in_one_batch(workdir):
    from lm.finetune.classify import Predictor

    folder = export_model(workdir, "classifier", task="classify")
    texts = ["import json", "glob.glob('*.py')", "shlex.split(line)"]
    with serving(folder) as s:
        r = httpx.post(f"{s.url}/v1/classify", json={"input": texts})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        expected = Predictor(folder).predict(__import__("pandas").DataFrame({"text": texts}))
        assert [d["label"] for d in data] == list(expected["label"])
        assert all(abs(sum(d["scores"].values()) - 1) < 1e-5 for d in data)
        assert [d["score"] for d in data] == pytest.approx(list(expected["score"]), abs=1e-6)
        wrong = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": HELLO})
        assert wrong.status_code == 400 and "classify" in wrong.json()["error"]["message"]
        assert httpx.post(f"{s.url}/v1/classify", json={"input": []}).status_code == 400


# ---- limits -----------------------------------------------------------------------------------------


def test_prompt_and_max_tokens_over_the_limits_are_400(chat_model):
    with serving(chat_model, max_prompt_tokens=24, max_new_tokens=64) as s:
        api = client(s)
        with pytest.raises(openai.BadRequestError) as e:
            api.completions.create(model="chat", prompt="word " * 40, max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=65)
        assert e.value.body["param"] == "max_tokens" and "64" in e.value.body["message"]
        assert api.completions.create(model="chat", prompt="def", max_tokens=64, temperature=0).usage.completion_tokens == 64


def test_a_body_over_the_limit_is_413_whether_its_size_is_announced_or_not(chat_model):
    with serving(chat_model, max_body_bytes=2000) as s:
        with pytest.raises(openai.APIStatusError) as e:
            client(s).completions.create(model="chat", prompt="a" * 3000, max_tokens=2)
        assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"

        def chunks():  # no Content-Length: the server counts the bytes as they arrive
            yield b'{"prompt": "'
            for _ in range(30):
                yield b"a" * 100
            yield b'", "max_tokens": 2}'

        r = httpx.post(f"{s.url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        assert client(s).completions.create(model="chat", prompt="a" * 100, max_tokens=2).choices


def test_requests_beyond_max_concurrent_get_a_quick_429_and_a_closed_stream_is_cancelled(chat_model):
    with serving(chat_model, max_concurrent=2) as s:
        api = client(s)
        streams = [api.completions.create(model="chat", prompt="def", max_tokens=1000, temperature=0, stream=True)
                   for _ in range(2)]
        for stream in streams:
            next(iter(stream))  # both are running
        t0 = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as e:
            api.completions.create(model="chat", prompt="def", max_tokens=4)
        assert time.perf_counter() - t0 < 1.0 and e.value.body["code"] == "too_many_requests"
        for stream in streams:
            stream.close()  # the clients go away: their rows must leave the batch, not run to 1000 tokens
        deadline = time.monotonic() + 5
        while metric(s, "lmforge_running_batch_size")[("lmforge_running_batch_size",)] and time.monotonic() < deadline:
            time.sleep(0.02)
        generated = metric(s, "lmforge_generated_tokens_total")[("lmforge_generated_tokens_total", ("version", "local"))]
        assert generated < 2 * 1000
        assert api.completions.create(model="chat", prompt="def", max_tokens=4, temperature=0).usage.completion_tokens == 4
        assert metric(s, "lmforge_requests_total")[
            ("lmforge_requests_total", ("route", "/v1/completions"), ("status", "429"), ("version", "local"))] == 1


def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(chat_model):
    with serving(chat_model) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/completions", json={"prompt": "def", "max_tokens": 1000, "temperature": 0},
                       timeout=0.2)
        deadline = time.monotonic() + 5
        while metric(s, "lmforge_running_batch_size")[("lmforge_running_batch_size",)] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        generated = metric(s, "lmforge_generated_tokens_total")[("lmforge_generated_tokens_total", ("version", "local"))]
        assert generated < 1000
        assert metric(s, "lmforge_requests_total")[
            ("lmforge_requests_total", ("route", "/v1/completions"), ("status", "499"), ("version", "local"))] == 1


def test_a_request_past_the_timeout_is_408_and_a_stream_ends_with_an_error(chat_model):
    with serving(chat_model, timeout_s=0.2) as s:
        api = client(s)
        with pytest.raises(openai.APIStatusError) as e:
            api.completions.create(model="chat", prompt="def", max_tokens=1000, temperature=0)
        assert e.value.status_code == 408 and e.value.body["code"] == "request_timeout"
        with pytest.raises(openai.APIError, match="longer than"):
            for _ in api.completions.create(model="chat", prompt="def", max_tokens=1000, temperature=0, stream=True):
                pass
        assert httpx.get(f"{s.url}/health").json()["status"] == "ok"
        assert api.completions.create(model="chat", prompt="def", max_tokens=2).choices


# ---- the command line -------------------------------------------------------------------------------


def test_the_command_says_in_one_line_when_the_model_or_its_store_is_missing_or_the_port_busy(chat_model, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "serve", *args], cwd=ROOT, env=child_env(),
                              capture_output=True, text=True, timeout=120)

    missing = serve("--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"lmforge: error: --model {tmp_path / 'nowhere'}: no such folder "
                                                   "(give an export folder or models:/NAME@ALIAS)"]
    nowhere = f"sqlite:///{tmp_path / 'mlflow.db'}"
    no_store = serve("--model", "models:/tiny@champion", "--tracking-uri", nowhere)
    assert no_store.returncode == 2 and no_store.stderr.strip().splitlines() == [
        f"lmforge: error: --model models:/tiny@champion: there is no MLflow store at {nowhere} (give --tracking-uri "
        "or set MLFLOW_TRACKING_URI)"]
    assert not (tmp_path / "mlflow.db").exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = serve("--model", str(chat_model), "--port", str(port))
    assert busy.returncode == 2
    assert busy.stderr.strip().splitlines()[-1] == (
        f"lmforge: error: port {port} on 127.0.0.1 is in use (another server? choose one with --port)")


# ---- following the registry -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(workdir, chat_model, tmp_path_factory) -> dict[str, str]:
    """A real sqlite MLflow store holding "tiny": version 1 (the chat model), version 2 (another
    seed), version 3 (a folder that cannot load)."""
    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    broken = work / "broken" / "export"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{}")  # an export folder without its weights
    folders = [chat_model, export_model(workdir, "chat-v2", seed=1), broken]
    versions = [register(uri, "tiny", folder, work) for folder in folders]
    return {"uri": uri, "v1": versions[0], "v2": versions[1], "broken": versions[2]}


@pytest.mark.slow  # 7-20 s here with the registry fixture (an MLflow store, 3 versions): a swap mid-stream
def test_a_moved_alias_is_served_after_the_running_stream_ends_on_the_old_version(registry):
    from mlflow import MlflowClient

    uri, v1, v2 = registry["uri"], registry["v1"], registry["v2"]
    store = MlflowClient(tracking_uri=uri)
    store.set_registered_model_alias("tiny", "champion", v1)

    # The engines in this process: a new version then loads in well under a second, while the old
    # one is still decoding its 900 tokens (an engine process takes seconds to start; the swap itself
    # is the same for both: test_engine_process_*).
    with serving("models:/tiny@champion", tracking_uri=uri, poll_seconds=0.1, engine_in_process=True) as s:
        api = client(s)
        assert [(m.id, m.model_dump()["version"]) for m in api.models.list().data] == [("tiny", v1)]
        old_text = api.completions.create(model="tiny", prompt="def", max_tokens=900, temperature=0).choices[0].text
        chunks = iter(api.completions.create(model="tiny", prompt="def", max_tokens=900, temperature=0, stream=True))
        first = next(chunks)
        store.set_registered_model_alias("tiny", "champion", v2)
        deadline = time.monotonic() + 30
        while api.models.list().data[0].model_dump()["version"] != v2:
            assert time.monotonic() < deadline, "the server did not pick up the moved alias"
            time.sleep(0.05)
        # The stream is still running, on version 1 ...
        assert metric(s, "lmforge_running_batch_size")[("lmforge_running_batch_size",)] == 1, (
            "the stream ended before the swap: nothing was tested")
        rest = list(chunks)
        assert {c.model for c in [first, *rest]} == {f"tiny/{v1}"}
        assert "".join(c.choices[0].text for c in [first, *rest] if c.choices) == old_text
        # ... and the next request gets version 2.
        new = api.completions.create(model="tiny", prompt="def", max_tokens=900, temperature=0)
        assert new.model == f"tiny/{v2}" and new.choices[0].text != old_text
        info = metric(s, "lmforge_model_info")
        assert [dict(k[1:])["version"] for k, v in info.items() if v == 1] == [v2]
        assert metric(s, "lmforge_model_swaps_total")[("lmforge_model_swaps_total",)] == 1


@pytest.mark.slow  # shares the registry fixture (~10 s to build)
def test_a_version_that_fails_to_load_leaves_the_old_one_serving(registry, caplog):
    from mlflow import MlflowClient

    store = MlflowClient(tracking_uri=registry["uri"])
    store.set_registered_model_alias("tiny", "canary", registry["v1"])
    with serving("models:/tiny@canary", tracking_uri=registry["uri"], poll_seconds=3600) as s:
        store.set_registered_model_alias("tiny", "canary", registry["broken"])
        assert s.follower.check() is False
        assert "failed to load" in caplog.text and f"still serving version {registry['v1']}" in caplog.text
        reply = client(s).completions.create(model="tiny", prompt="def", max_tokens=3)
        assert reply.model == f"tiny/{registry['v1']}"
        assert metric(s, "lmforge_model_load_failures_total")[("lmforge_model_load_failures_total",)] == 1


def test_a_stream_that_fell_behind_catches_up_in_longer_chunks_with_the_same_text():
    import asyncio

    from lm.serving.app import _Events, _Mailbox
    from lm.serving.engine import Delta, Failed, Finished

    async def read() -> list:
        events = _Events(_Mailbox(asyncio.get_running_loop()))
        for e in [Delta("a", 1), Delta("b", 2), Delta("c", 3), Failed("x"), Delta("d", 4), Delta("e", 5),
                  Finished("f", "abcdef", "stop", 3, 6)]:
            events.queue.put_nowait(e)
        return [await events.get() for _ in range(3)]

    merged, failed, end = asyncio.run(read())
    assert merged == Delta("abc", 3) and failed == Failed("x")  # an error is never merged away
    assert end == Finished("def", "abcdef", "stop", 3, 6)
