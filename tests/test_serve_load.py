"""Load (issue 12): 5,000 mixed requests at concurrency 32 against a live ``lmforge serve`` process on
127.0.0.1 serving a tiny chat model: chat and completions, whole and streamed, and bad requests
(malformed JSON, an unknown model, max_tokens over the limit, no API key, classify on a decoder)
that must each get their 4xx. No request may end otherwise (no 5xx, no dropped connection), and the
server's memory (its process and the engine's, VmRSS) may grow by less than 10%.

Run with ``pytest -s tests/test_serve_load.py`` to see the figures."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from serve_fixtures import KEY, export_model, free_port, make_workdir, stop_process, wait_until_up
from train_fixtures import ROOT, child_env

REQUESTS = 5_000
CONCURRENCY = 32
WARMUP = 300  # requests before the first memory reading: allocator pools and caches filled once
HEADERS = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "What does json.dumps do?"}]

# name: (share, path, body or raw bytes, headers, expected status)
MIX = {
    "chat": (0.30, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8}, HEADERS, 200),
    "completion": (0.25, "/v1/completions", {"prompt": "def parse(", "max_tokens": 8, "temperature": 0.7}, HEADERS, 200),
    "chat-stream": (0.15, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "stream": True}, HEADERS, 200),
    "completion-stream": (0.10, "/v1/completions", {"prompt": "import ", "max_tokens": 8, "stream": True,
                                                    "stream_options": {"include_usage": True}}, HEADERS, 200),
    "bad-json": (0.04, "/v1/chat/completions", b'{"messages": [', HEADERS, 400),
    "unknown-model": (0.04, "/v1/completions", {"model": "gpt-4o", "prompt": "x"}, HEADERS, 404),
    "max-tokens-1e9": (0.04, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**9}, HEADERS, 400),
    "no-key": (0.04, "/v1/completions", {"prompt": "x", "max_tokens": 2}, {}, 401),
    "classify-on-decoder": (0.04, "/v1/classify", {"input": ["import json"]}, HEADERS, 400),
}


def rss_mb(pid: int) -> float:
    """VmRSS of the server and its children (the engine's process), MiB."""
    total = 0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        total += int(re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{p.pid}/status").read_text(), re.M).group(1))
    return total / 1024


async def one(client: httpx.AsyncClient, kind: str) -> tuple[str, int | str, float]:
    """One request of this kind -> (kind, status or the exception's name, seconds to its last byte)."""
    _, path, body, headers, _ = MIX[kind]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", path, content=content,
                                 headers={**headers, "Content-Type": "application/json"}) as r:
            data = b"".join([chunk async for chunk in r.aiter_bytes()])
        status: int | str = r.status_code
        if status == 200 and body.get("stream") and not data.rstrip().endswith(b"data: [DONE]"):
            status = "stream without [DONE]"
        elif status == 200 and not body.get("stream") and not json.loads(data)["choices"]:
            status = "no choices"
        elif status != 200 and "error" not in json.loads(data):
            status = f"{status} without an OpenAI error"
    except httpx.HTTPError as e:
        status = f"{type(e).__name__}: {e}"
    return kind, status, time.perf_counter() - t0


async def run(url: str, kinds: list[str]) -> list[tuple[str, int | str, float]]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for k in kinds:
            queue.put_nowait(k)
        results: list[tuple[str, int | str, float]] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one(client, queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


@pytest.mark.slow  # ~60-120 s on a 2-core box
def test_5000_mixed_requests_at_concurrency_32(tmp_path_factory):
    model = export_model(make_workdir(tmp_path_factory), "chat")
    port, log = free_port(), tmp_path_factory.mktemp("load") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--model", str(model), "--port", str(port), "--api-key", KEY,
             "--served-model-name", "chat", "--max-new-tokens", "32"],
            cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log)
        rng = random.Random(0)
        names, shares = list(MIX), [MIX[k][0] for k in MIX]
        asyncio.run(run(url, rng.choices(names, shares, k=WARMUP)))
        before = rss_mb(proc.pid)
        kinds = rng.choices(names, shares, k=REQUESTS)
        t0 = time.perf_counter()
        results = asyncio.run(run(url, kinds))
        elapsed = time.perf_counter() - t0
        after = rss_mb(proc.pid)
        assert proc.poll() is None
        served_log = log.read_text()  # before the shutdown, whose own noise is not the load's
    finally:
        stop_process(proc)

    wrong = [(k, s) for k, s, _ in results if s != MIX[k][4]]
    not_4xx = [(k, s) for k, s in wrong if not (isinstance(s, int) and 400 <= s < 500)]
    latencies = sorted(t for _, _, t in results)
    good = sorted(t for k, _, t in results if MIX[k][4] == 200)
    p99 = latencies[int(0.99 * len(latencies)) - 1]
    counts = {k: kinds.count(k) for k in MIX}
    print(f"\nload: {len(results)} requests ({counts}) at concurrency {CONCURRENCY} in {elapsed:.1f} s "
          f"({len(results) / elapsed:.0f}/s); errors that are not the expected status: {len(wrong)} "
          f"(not 4xx: {len(not_4xx)}); latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms (generations p99 {good[int(0.99 * len(good)) - 1] * 1000:.0f} ms); "
          f"server RSS {before:.0f} -> {after:.0f} MiB ({(after - before) / before:+.1%})")
    assert len(results) == REQUESTS
    assert not not_4xx, not_4xx[:10]
    assert not wrong, wrong[:10]
    assert after < 1.10 * before, f"RSS grew from {before:.0f} to {after:.0f} MiB"
    assert "Traceback" not in served_log
