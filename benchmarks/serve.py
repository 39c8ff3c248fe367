"""``lmforge serve`` under load, beside Hugging Face ``transformers``' ``generate`` on the same weights.

    python benchmarks/serve.py                           # the demo's shape (conf/default.yaml), random weights
    python benchmarks/serve.py --model runs/export/<key> --new-tokens 64

The server runs as its own process (``lmforge serve``, as a user starts it); this process is the
clients: streaming completions (greedy, ``--new-tokens`` each, prompts cut from standard-library
source lines) at each concurrency of ``--concurrency`` for the matching count of ``--requests``.
Beside them, in this process, ``transformers``' ``LlamaForCausalLM.generate`` on the same weights
(one prompt at a time, and batches of 8 left-padded prompts) and lmforge's engine without HTTP, one
request at a time. Everything runs in ``--rounds`` rounds (each level's requests split over them,
the in-process contenders after the first level, the server idle meanwhile) and each figure of speed
keeps its best round: on a shared machine a neighbour's burst only ever slows a round down, and
alternating lets no contender have the quiet minutes to itself. Latency percentiles and errors are
over every request; time to first token is the arrival of a request's first text chunk. Server
memory (RSS of the server's process and of its engine's) is read after a warm-up at the highest
concurrency and again after the last round.

The last line holds the figures as key=value pairs: ``ratio_vs_transformers`` (one stream through
HTTP over transformers one prompt at a time, in process), ``batching_gain`` (total tokens/s at
concurrency 8 over concurrency 1), ``p99_ms_c8``, ``errors``, ``mem_growth`` (RSS after / before - 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STDLIB = Path(json.__file__).parent.parent
SOURCES = ["json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "argparse.py", "pathlib.py",
           "csv.py", "string.py", "base64.py", "dataclasses.py", "inspect.py", "typing.py", "functools.py"]


def demo_folder(out: Path, vocab_size: int) -> Path:
    """The demo's network (conf/default.yaml's model section), random weights, with a byte-level BPE
    tokenizer of ``vocab_size`` learned from standard-library sources and its chat template."""
    import torch

    from lm.config import SPECIAL_TOKENS, load_config
    from lm.models.folder import build_model, save_model
    from lm.models.transformer import model_args
    from lm.text.chat import write_tokenizer_config
    from lm.text.tokenizer import special_ids, train_bpe

    texts = [(STDLIB / s).read_text(encoding="utf-8") for s in SOURCES]
    tok = train_bpe(iter(texts), vocab_size, list(SPECIAL_TOKENS))
    cfg = load_config(str(ROOT / "conf" / "default.yaml"), [])
    torch.manual_seed(0)
    model = build_model(model_args(cfg.model, tok.get_vocab_size())).eval()
    save_model(model, out, extra=special_ids(tok, list(SPECIAL_TOKENS)))
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out, tok, list(SPECIAL_TOKENS))
    return out


def prompts(n: int) -> list[str]:
    """Source lines of the standard library (30-120 characters), repeated to n."""
    lines = [line.strip()[:120] for s in SOURCES for line in (STDLIB / s).read_text(encoding="utf-8").splitlines()
             if len(line.strip()) >= 30]
    return [lines[(i * 7919) % len(lines)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one_request(client, url: str, prompt: str, new_tokens: int) -> tuple[float, float, int] | None:
    """-> (latency s, time to first token s, completion tokens), or None for an error."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return None
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception:
        return None
    latency = time.perf_counter() - t0
    return (latency, first if first is not None else latency, tokens) if done else None


async def load(url: str, texts: list[str], concurrency: int, new_tokens: int) -> dict[str, float]:
    """``len(texts)`` requests, ``concurrency`` at a time -> throughput, latency and error figures."""
    results: list = []
    t0 = time.perf_counter()
    await collect(url, texts, concurrency, new_tokens, results)
    return summarize(results, time.perf_counter() - t0)


async def collect(url: str, texts: list[str], concurrency: int, new_tokens: int, into: list) -> None:
    """``len(texts)`` requests, ``concurrency`` at a time; each one's (latency, first token, tokens) or None."""
    import httpx

    todo = iter(texts)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            for text in todo:
                into.append(await one_request(client, url, text, new_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def summarize(results: list[tuple[float, float, int] | None], wall: float) -> dict[str, float]:
    ok = [r for r in results if r is not None]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "rps": len(ok) / wall,
        "tok_s": sum(r[2] for r in ok) / wall,
        "p50_ms": 1000 * percentile([r[0] for r in ok], 0.5),
        "p99_ms": 1000 * percentile([r[0] for r in ok], 0.99),
        "ttft_p50_ms": 1000 * percentile([r[1] for r in ok], 0.5),
        "ttft_p99_ms": 1000 * percentile([r[1] for r in ok], 0.99),
        "mean_tokens": sum(r[2] for r in ok) / max(1, len(ok)),
    }


def start_server(folder: Path, port: int, threads: int, log: Path) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--model", str(folder), "--port", str(port),
         "--max-concurrent", "64", "--max-batch-size", "32", "--timeout-s", "600"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server stopped: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not answer /health within 180 s")


def in_process_contenders(
    folder: Path, texts: list[str], new_tokens: int, singles: int, batch: int
) -> tuple[dict[str, Callable[[], int]], Callable[[], None]]:
    """What runs in this process, each a call -> tokens generated: LlamaForCausalLM.generate (greedy,
    KV cache) on the same weights and prompts, one at a time and in batches, and lmforge's engine
    without HTTP (what the server's HTTP and the clients add is the rest); and how to stop them."""
    import torch
    import transformers

    from lm.generation.sampling import SamplingParams
    from lm.models.hf import hf_config_and_state
    from lm.models.load_for_generation import load_for_generation
    from lm.models.transformer import llama_config_dict
    from lm.serving.engine import Finished, GenerationEngine

    transformers.logging.set_verbosity_error()
    gm = load_for_generation(folder)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(gm.model.args))).eval()
    hf.load_state_dict(hf_config_and_state(gm.model)[1], strict=False)
    hf.generation_config.eos_token_id = None  # every prompt gets exactly new_tokens, as the server's do here
    hf.generation_config.pad_token_id = 0
    ids = [gm.tokenizer.encode(t).ids for t in texts]

    def run(rows: list[list[int]]) -> int:
        width = max(map(len, rows))
        x = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):  # left padding, as decoder-only batched generation needs
            x[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=mask, do_sample=False, use_cache=True,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return (out.shape[1] - width) * len(rows)

    def engine_run(rows: list[list[int]]) -> int:
        """lmforge's engine in this process, no HTTP: one request at a time."""
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
        n = 0
        for row in rows:
            events: queue.SimpleQueue = queue.SimpleQueue()
            engine.submit(row, params, events.put)
            while not isinstance(event := events.get(), Finished):
                pass
            n += event.completion_tokens
        return n

    engine = GenerationEngine(gm.model, gm.tokenizer, gm.eos_ids)
    engine.start()
    run(ids[:2])  # warm-up
    engine_run(ids[:2])
    batches = [ids[i : i + batch] for i in range(0, min(len(ids), singles * 2), batch)]
    contenders = {
        "hf_tok_s_single": lambda: sum(run([row]) for row in ids[:singles]),
        "engine_tok_s_single": lambda: engine_run(ids[:singles]),
        f"hf_tok_s_batched{batch}": lambda: sum(run(rows) for rows in batches),
    }

    def stop() -> None:
        engine.close()
        # A daemon thread still inside torch when the interpreter exits aborts it ("terminate called
        # without an active exception", exit 134, after the figures were printed): wait for it.
        engine.join(timeout=30)

    return contenders, stop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an export or decoder folder; default: the demo's shape, random weights")
    p.add_argument("--vocab-size", type=int, default=4096, help="without --model (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", default="200,600,1200", help="per concurrency level (2,000 in all by default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of transformers (default "
                   "%(default)s: on a shared 2-core machine two threads wait on each other)")
    p.add_argument("--hf-prompts", type=int, default=24, help="prompts transformers answers one at a time")
    p.add_argument("--rounds", type=int, default=3, help="in-process rounds; each contender keeps its best")
    a = p.parse_args()
    import psutil
    import torch

    torch.set_num_threads(a.threads)
    levels = [int(c) for c in a.concurrency.split(",")]
    counts = [int(n) for n in a.requests.split(",")]
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-serve-") as tmp:
        folder = Path(a.model) if a.model else demo_folder(Path(tmp) / "model", a.vocab_size)
        port = free_port()
        server = start_server(folder, port, a.threads, Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{port}"

        def rss() -> int:
            """The server's memory: its process and the engine's (lm.serving.process)."""
            main = psutil.Process(server.pid)
            return sum(p.memory_info().rss for p in [main, *main.children(recursive=True)])

        contenders, stop = in_process_contenders(folder, prompts(2 * a.hf_prompts), a.new_tokens, a.hf_prompts, 8)
        best = dict.fromkeys(contenders, 0.0)
        results: dict[int, list] = {c: [] for c in levels}
        best_level: dict[int, dict[str, float]] = {}
        try:
            asyncio.run(load(url, prompts(2 * max(levels)), max(levels), a.new_tokens))  # warm-up at the peak
            rss_before = rss()
            # Rounds: each level's requests are split over them, and between two levels the contenders
            # in this process run once (the server idles meanwhile). Each keeps its best round: on a
            # shared machine a neighbour's burst only ever slows a round down, whichever it hits.
            for r in range(a.rounds):
                for c, n in zip(levels, counts, strict=True):
                    texts = prompts(n)[r * n // a.rounds : (r + 1) * n // a.rounds]
                    raw: list = []
                    t0 = time.perf_counter()
                    asyncio.run(collect(url, texts, c, a.new_tokens, raw))
                    f = summarize(raw, time.perf_counter() - t0)
                    results[c] += raw
                    if f["tok_s"] > best_level.get(c, {}).get("tok_s", 0.0):
                        best_level[c] = f
                    if c != levels[0]:
                        continue
                    for name, fn in contenders.items():  # as many rounds as each server level gets
                        t0 = time.perf_counter()
                        best[name] = max(best[name], fn() / (time.perf_counter() - t0))
            rss_after = rss()
        finally:
            stop()
            server.terminate()
            server.wait(timeout=60)
    figures: dict[str, float] = {}
    errors = 0
    for c, n in zip(levels, counts, strict=True):
        whole = summarize(results[c], 1.0)  # latency and errors over every round; throughput: the best round
        f = {**whole, "rps": best_level[c]["rps"], "tok_s": best_level[c]["tok_s"]}
        errors += int(whole["errors"])
        print(f"concurrency {c:>3}: {n} requests, {f['rps']:.1f} req/s, {f['tok_s']:.0f} tokens/s (best of "
              f"{a.rounds} rounds), latency p50 {f['p50_ms']:.0f} ms p99 {f['p99_ms']:.0f} ms, first token p50 "
              f"{f['ttft_p50_ms']:.0f} ms p99 {f['ttft_p99_ms']:.0f} ms, {f['mean_tokens']:.1f} tokens/request, "
              f"{int(whole['errors'])} errors", flush=True)
        figures.update({f"{k}_c{c}": round(v, 1) for k, v in f.items() if k not in ("requests", "errors")})
    hf = best
    print(f"server RSS {rss_before / 2**20:.0f} MiB after warm-up, {rss_after / 2**20:.0f} MiB after "
          f"{sum(counts)} requests", flush=True)
    print(f"transformers generate: {hf['hf_tok_s_single']:.0f} tokens/s one prompt at a time, "
          f"{hf['hf_tok_s_batched8']:.0f} tokens/s in batches of 8 (left-padded); lmforge's engine in "
          f"process, no HTTP: {hf['engine_tok_s_single']:.0f} tokens/s one at a time", flush=True)
    out = {
        "ratio_vs_transformers": round(figures["tok_s_c1"] / hf["hf_tok_s_single"], 3),
        "engine_ratio_vs_transformers": round(hf["engine_tok_s_single"] / hf["hf_tok_s_single"], 3),
        "ratio_vs_transformers_batched8": round(figures[f"tok_s_c{8}"] / hf["hf_tok_s_batched8"], 3)
        if "tok_s_c8" in figures else None,
        "batching_gain": round(figures["tok_s_c8"] / figures["tok_s_c1"], 3) if "tok_s_c8" in figures else None,
        "p99_ms_c8": figures.get("p99_ms_c8"),
        "errors": errors,
        "mem_growth": round(rss_after / rss_before - 1, 4),
        "requests": sum(counts),
        "new_tokens": a.new_tokens,
        "threads": a.threads,
        **figures,
        **{k: round(v, 1) for k, v in hf.items()},
        "rss_mib_before": round(rss_before / 2**20, 1),
        "rss_mib_after": round(rss_after / 2**20, 1),
    }
    print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
