"""The generation engine in a process of its own (lm.serving.process): the same tokens as the engine
in a thread, requests finished before it stops, cancellation, and neither process outliving the
other's death with a request left hanging."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import openai
import psutil
import pytest
from serve_fixtures import client, export_model, free_port, make_workdir, serving, wait_until_up
from train_fixtures import ROOT, child_env

from lm.generation.sampling import SamplingParams
from lm.models.load_for_generation import load_for_generation
from lm.serving.engine import Delta, Failed, Finished, GenerationEngine
from lm.serving.process import EngineProcess, stop_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_model(make_workdir(tmp_path_factory), "engine-process")


@pytest.fixture(scope="module")
def engine(model):
    e = EngineProcess(model, max_batch_size=8)
    e.start()
    yield e
    e.close()
    e.join(30)


def answer(engine, prompt: list[int], params: SamplingParams) -> tuple[list, Finished | Failed]:
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(prompt, params, events.put)
    seen = []
    while not isinstance(event := events.get(timeout=60), Finished | Failed):
        seen.append(event)
    return seen, event


def test_it_answers_concurrent_requests_as_the_engine_in_a_thread_does(model, engine):
    gm = load_for_generation(model)
    prompts = [gm.tokenizer.encode(t).ids for t in ("def parse(", "import json", "class A:", "x = [")]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    local = GenerationEngine(gm.model, gm.tokenizer, stop_ids(gm), max_batch_size=8)
    local.start()
    try:
        expected = [answer(local, p, params)[1].full_text for p in prompts]
    finally:
        local.close()
        local.join(30)
    assert engine.info.seq_len == gm.model.args.seq_len and engine.info.eos_ids == stop_ids(gm)
    queues = []
    for p in prompts:  # all in flight at once: decoded in one batch
        q: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit(p, params, q.put)
        queues.append(q)
    got = []
    for q in queues:
        texts = []
        while not isinstance(event := q.get(timeout=60), Finished):
            assert isinstance(event, Delta), event
            texts.append(event.text)
        assert "".join(texts) + event.text == event.full_text  # the pieces add up to the whole
        assert event.completion_tokens == 24
        got.append(event.full_text)
    assert got == expected
    assert engine.running == 0 and engine.queue_depth == 0


def test_a_cancelled_request_hears_nothing_more_and_frees_its_row(engine):
    events: queue.SimpleQueue = queue.SimpleQueue()
    job = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=900, temperature=0), events.put)
    assert isinstance(events.get(timeout=60), Delta)
    engine.cancel(job)
    assert engine.running == 0 and engine.queue_depth == 0
    time.sleep(0.5)
    # What the child sent before it read the cancel is dropped in this process.
    assert events.empty(), f"an event after cancel: {events.get()}"
    # The engine goes on with the next request.
    assert answer(engine, [5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0))[1].completion_tokens == 3


def test_close_finishes_the_running_request_then_the_process_ends(model):
    e = EngineProcess(model)
    e.start()
    events: queue.SimpleQueue = queue.SimpleQueue()
    e.submit([5, 6, 7], SamplingParams(max_new_tokens=300, temperature=0), events.put)
    assert isinstance(events.get(timeout=60), Delta)
    e.close()
    with pytest.raises(Exception, match="no longer takes requests"):
        e.submit([5], SamplingParams(max_new_tokens=1), events.put)
    while not isinstance(event := events.get(timeout=60), Finished):
        assert isinstance(event, Delta)
    assert event.completion_tokens == 300
    assert e.join(30) and e.exited and not e._proc.is_alive()


def test_a_killed_engine_process_fails_its_requests_instead_of_leaving_them_waiting(model):
    e = EngineProcess(model)
    e.start()
    events: queue.SimpleQueue = queue.SimpleQueue()
    e.submit([5, 6, 7], SamplingParams(max_new_tokens=900, temperature=0), events.put)
    assert isinstance(events.get(timeout=60), Delta)
    os.kill(e._proc.pid, signal.SIGKILL)
    while not isinstance(event := events.get(timeout=30), Failed):
        pass
    assert "engine stopped" in event.message
    assert e.join(30) and e.exited and e.closed


def test_the_engine_process_ends_when_the_server_process_is_killed(model):
    script = textwrap.dedent(f"""
        import queue, sys
        from lm.generation.sampling import SamplingParams
        from lm.serving.process import EngineProcess
        e = EngineProcess({str(model)!r})
        e.start()
        e.submit([5, 6, 7], SamplingParams(max_new_tokens=20, temperature=0), queue.SimpleQueue().put)
        print(e._proc.pid, flush=True)
        sys.stdin.read()
    """)
    server = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=child_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child = psutil.Process(int(server.stdout.readline()))
        server.kill()
        server.wait(30)
        child.wait(timeout=30)  # raises TimeoutExpired if it lingers
    finally:
        server.kill()


def test_the_server_starts_a_new_engine_when_its_engine_process_is_killed(model):
    with serving(model) as s:
        api = client(s)
        before = api.completions.create(model="chat", prompt="def", max_tokens=8, temperature=0).choices[0].text
        [engine_pid] = [p.pid for p in psutil.Process().children() if p.pid == s.slot.current.engine._proc.pid]
        stream = api.completions.create(model="chat", prompt="def", max_tokens=900, temperature=0, stream=True)
        next(iter(stream))
        os.kill(engine_pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine"):  # the running stream ends with an error event
            list(stream)
        deadline = time.monotonic() + 120
        while s.slot.current.engine._proc.pid == engine_pid or httpx.get(f"{s.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "no new engine within 120 s"
            time.sleep(0.2)
        after = api.completions.create(model="chat", prompt="def", max_tokens=8, temperature=0).choices[0].text
        assert after == before


def test_a_service_stop_sigterm_to_every_process_ends_the_server_and_its_engine_quietly(model, tmp_path):
    """systemd stops a service with SIGTERM to every process in it (KillMode=control-group): the
    engine leaves ending to the server, which finishes and closes it; no traceback, nothing left."""
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--model", str(model), "--port",
                                   str(port)], cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server, log)
        family = [server.pid, *(p.pid for p in psutil.Process(server.pid).children(recursive=True))]
        os.killpg(server.pid, signal.SIGTERM)
        # uvicorn shuts down gracefully, then ends by the signal it caught (systemd counts that as clean).
        assert server.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert "Application shutdown complete" in log.read_text()
        _, alive = psutil.wait_procs([psutil.Process(pid) for pid in family[1:] if psutil.pid_exists(pid)], timeout=15)
        assert not alive, [p.cmdline() for p in alive]
        text = log.read_text()
        assert "Traceback" not in text and "BrokenPipeError" not in text and "engine process" not in text, text[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
