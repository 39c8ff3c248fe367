"""Bad requests to ``lmforge serve``, table-driven, against one real server on 127.0.0.1: each gets
its exact 4xx status and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``,
and the server still answers a good request afterwards.

Bodies of 100 MB go over a raw socket, as a hostile client sends them: chunked without a
Content-Length, announced honestly, and with a Content-Length that lies."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from serve_fixtures import HELLO, KEY, export_model, make_workdir, serving

from lm.serving.server import Server

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_PROMPT = 256
MAX_NEW = 64
HUNDRED_MB = 100 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    model = export_model(make_workdir(tmp_path_factory), "chat")
    with serving(model, api_key=KEY, served_model_name="tiny-chat", max_prompt_tokens=MAX_PROMPT,
                 max_new_tokens=MAX_NEW) as s:
        yield s


@dataclass
class Case:
    name: str
    body: Any  # a dict (sent as JSON), bytes (sent as they are) or None (no body)
    status: int
    param: str | None = None
    code: str | None = None
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {KEY}"})


def chat(**fields) -> dict[str, Any]:
    return {"model": "tiny-chat", "messages": HELLO, "max_tokens": 4, **fields}


NO_KEY: dict[str, str] = {}
CASES = [
    Case("malformed JSON", b'{"messages": [{"role": "user", "content": "hi"}', 400, None, "invalid_json"),
    Case("JSON with a trailing comma", b'{"messages": [],}', 400, None, "invalid_json"),
    Case("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    Case("a JSON array, not an object", b"[1, 2]", 400, None, "invalid_request"),
    Case("no body", None, 400, None, "invalid_request"),
    Case("messages a string", {"messages": "hi"}, 400, "messages", "invalid_request"),
    Case("max_tokens a string", chat(max_tokens="8"), 400, "max_tokens", "invalid_request"),
    Case("max_tokens a float", chat(max_tokens=8.0), 400, "max_tokens", "invalid_request"),
    Case("stream a string", chat(stream="yes"), 400, "stream", "invalid_request"),
    Case("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content",
         "invalid_request"),
    Case("a message not an object", {"messages": ["hi"]}, 400, "messages.0", "invalid_request"),
    Case("an image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         400, "messages.0.content", "invalid_request"),
    Case("oversize prompt", chat(messages=[{"role": "user", "content": "word " * 600}]), 400, "messages",
         "context_length_exceeded"),
    Case("oversize completion prompt", {"prompt": "word " * 600, "max_tokens": 2}, 400, "prompt",
         "context_length_exceeded", path="/v1/completions"),
    Case("max_tokens of 10**9", chat(max_tokens=10**9), 400, "max_tokens", "max_tokens_exceeded"),
    Case("max_completion_tokens of 10**9", chat(max_completion_tokens=10**9), 400, "max_completion_tokens",
         "max_tokens_exceeded"),
    Case("max_tokens 0", chat(max_tokens=0), 400, "max_tokens", "invalid_request"),
    Case("unknown model", chat(model="gpt-4o"), 404, "model", "model_not_found"),
    Case("a model name that climbs out", chat(model="../../etc/passwd"), 404, "model", "model_not_found"),
    Case("wrong role", chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role",
         "invalid_request"),
    Case("tool role", chat(messages=[{"role": "tool", "content": "hi"}]), 400, "messages.0.role", "invalid_request"),
    Case("empty messages", chat(messages=[]), 400, "messages", "invalid_request"),
    Case("missing API key", chat(), 401, None, "invalid_api_key", headers=NO_KEY),
    Case("wrong API key", chat(), 401, None, "invalid_api_key", headers={"Authorization": "Bearer sk-wrong"}),
    Case("key without Bearer", chat(), 401, None, "invalid_api_key", headers={"Authorization": KEY}),
    Case("unknown route", {}, 404, None, "not_found", path="/v1/nope"),
    Case("wrong method", None, 405, None, "method_not_allowed", method="GET"),
    Case("n of 2", chat(n=2), 400, "n", "unsupported_parameter"),
    Case("several prompts", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter", path="/v1/completions"),
    Case("tools", chat(tools=[{"type": "function"}]), 400, "tools", "unsupported_parameter"),
    Case("logprobs", chat(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    Case("negative temperature", chat(temperature=-0.5), 400, "temperature", "invalid_request"),
    Case("temperature 3", chat(temperature=3), 400, "temperature", "invalid_request"),
    Case("temperature 1e-300", chat(temperature=1e-300), 400, "temperature", "invalid_request"),
    Case("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
         "temperature", "invalid_request"),
    Case("top_p 1.5", chat(top_p=1.5), 400, "top_p", "invalid_request"),
    Case("top_p 0", chat(top_p=0), 400, "top_p", "invalid_request"),
    Case("top_p 1e-300", chat(top_p=1e-300), 400, "top_p", "invalid_request"),
    Case("repetition_penalty Infinity", b'{"messages": [{"role": "user", "content": "hi"}], '
         b'"repetition_penalty": Infinity}', 400, "repetition_penalty", "invalid_request"),
    Case("repetition_penalty 1e-300", chat(repetition_penalty=1e-300), 400, "repetition_penalty", "invalid_request"),
    Case("top_k 10**30", chat(top_k=10**30), 400, "top_k", "invalid_request"),
    Case("seed of 2**70", chat(seed=2**70), 400, "seed", "invalid_request"),
    Case("seed below -2**63", chat(seed=-(2**63) - 1), 400, "seed", "invalid_request"),
    Case("a stop list too long", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_request"),
    Case("an empty stop string", chat(stop=[""]), 400, "stop", "invalid_request"),
    Case("a lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content",
         "invalid_request"),
    Case("classify on a decoder", {"input": "import json"}, 400, "model", "wrong_model_kind", path="/v1/classify"),
    Case("an unknown model's card", None, 404, "model", "model_not_found", path="/v1/models/gpt-4o", method="GET"),
]


def good_request_succeeds(server: Server) -> bool:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(max_tokens=2, temperature=0),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def assert_openai_error(body: dict[str, Any], status: int, param: str | None, code: str | None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), body
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    assert error["param"] == param and error["code"] == code, body
    expected_type = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    assert error["type"] == expected_type, body


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_request_gets_its_4xx_and_an_openai_error_and_the_server_stays_up(server, case):
    content = case.body if isinstance(case.body, bytes | None) else json.dumps(case.body).encode()
    headers = {**case.headers, **({"Content-Type": "application/json"} if content is not None else {})}
    r = httpx.request(case.method, f"{server.url}{case.path}", content=content, headers=headers, timeout=30)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/json"
    assert_openai_error(r.json(), case.status, case.param, case.code)
    assert good_request_succeeds(server)


# ---- bodies of 100 MB, over a raw socket ----------------------------------------------------------------


def send_body(server: Server, headers: list[str], chunks: Iterator[bytes]) -> tuple[int, dict[str, str], bytes, int]:
    """POST /v1/chat/completions with these header lines and body chunks, stopping as soon as the server
    answers (or closes) -> (status, response headers, response body, bytes of request body sent)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
            f"Authorization: Bearer {KEY}", "Content-Type: application/json", *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = 0
    sock.setblocking(False)
    received = b""
    try:
        for chunk in chunks:
            try:
                received += sock.recv(65536)
            except BlockingIOError:
                pass
            if received:
                break  # the server has answered: a client would stop sending too
            view = memoryview(chunk)
            while view:
                try:
                    n = sock.send(view)
                except BlockingIOError:
                    time.sleep(0.001)
                    try:
                        received += sock.recv(65536)
                    except BlockingIOError:
                        pass
                    if received:
                        break
                    continue
                sent += n
                view = view[n:]
            if received:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection on us: its answer may already be in our buffer
    sock.setblocking(True)
    sock.settimeout(30)
    try:
        while b"\r\n\r\n" not in received or len(received) < _response_length(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    response_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split(" ", 2)[1]), response_headers, body[: _response_length(received) - len(head_bytes) - 4], sent


def _response_length(received: bytes) -> int:
    head, sep, _ = received.partition(b"\r\n\r\n")
    if not sep:
        return 1 << 62
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return 1 << 62


def hundred_mb(chunked: bool) -> Iterator[bytes]:
    piece = b"a" * (1 << 20)
    first = b'{"messages": [{"role": "user", "content": "'
    frame = (lambda b: b"%x\r\n%s\r\n" % (len(b), b)) if chunked else (lambda b: b)
    yield frame(first)
    for _ in range(100):
        yield frame(piece)
    yield frame(b'"}]}')
    if chunked:
        yield b"0\r\n\r\n"


@pytest.mark.parametrize(
    "headers, chunked",
    [(["Transfer-Encoding: chunked"], True), ([f"Content-Length: {HUNDRED_MB + 48}"], False)],
    ids=["chunked-without-a-length", "length-announced"],
)
def test_a_body_of_100_mb_is_413_before_it_is_read(server, headers, chunked):
    """Without a Content-Length the server counts the bytes as they arrive; with one, it answers on the
    header alone."""
    status, response_headers, body, sent = send_body(server, headers, hundred_mb(chunked))
    assert status == 413, body
    assert_openai_error(json.loads(body), 413, None, "request_too_large")
    assert sent < 20 * 2**20, f"the server read {sent} bytes before answering"
    assert good_request_succeeds(server)


def test_a_body_longer_than_its_content_length_is_400_and_the_connection_closed(server):
    """A Content-Length of 100 followed by 100 MB: what follows the 100 bytes is not an HTTP request,
    and uvicorn's parser refuses it (before any route runs, so its body is plain text, not OpenAI's
    JSON) and closes the connection; no one reads the 100 MB."""
    status, response_headers, body, sent = send_body(server, ["Content-Length: 100"], hundred_mb(False))
    assert status == 400 and response_headers["connection"] == "close", body
    assert b"Invalid HTTP request" in body
    assert sent < 20 * 2**20, f"the server read {sent} bytes before answering"
    assert good_request_succeeds(server)
