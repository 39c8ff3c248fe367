"""What the serving tests share: a tiny chat model (and classifier) exported as the pipeline
exports them, ``lmforge serve`` in this process on a free port of 127.0.0.1, the openai client, a
/metrics reader, and registering an export folder in an MLflow store. A test module makes its
own module-scoped fixtures from them (``workdir`` from :func:`make_workdir`, ``chat_model`` from
:func:`export_model`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import torch
from prometheus_client.parser import text_string_to_metric_families
from train_fixtures import ROOT, child_env, make_token_dir

from lm.serving.protocol import Limits
from lm.serving.server import ServeOptions, Server

KEY = "sk-test-serve"
CONTEXT = 1024  # long enough that a stream of ~1000 tokens is still running while a test acts
HELLO = [{"role": "user", "content": "What does `json.dumps(obj)` do?"}]


# ---- tiny models, exported as the pipeline exports them ---------------------------------------------


def make_workdir(tmp_path_factory) -> dict[str, Path]:
    """(a module's ``workdir`` fixture) A token dir (real tokenize stage: BPE tokenizer + ChatML config) and a little sft data."""
    from lm.config import Config, FinetuneConfig
    from lm.data.instruct import build_instruct_data

    root = tmp_path_factory.mktemp("serve")
    tokens = make_token_dir(root / "tokens")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(20)]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "sft-data").mkdir()
    build_instruct_data(Config(finetune=FinetuneConfig(task="sft", data=str(root / "sft.jsonl"))),
                        out_dir=root / "sft-data")
    (root / "classify-data").mkdir()
    (root / "classify-data" / "labels.json").write_text(json.dumps(["json", "glob", "shlex"]))
    return {"root": root, "tokens": tokens}


def export_model(workdir: dict[str, Path], name: str, task: str = "sft", seed: int = 0) -> Path:
    """An export folder (lm.pipeline.export.export) of a tiny untrained decoder (sft) or classifier."""
    from lm.models.folder import build_model, save_model
    from lm.models.transformer import ModelArgs, SequenceClassifier
    from lm.pipeline.export import export
    from lm.text.chat import ChatFormat
    from lm.text.shards import TokenIndex

    root, tokens = workdir["root"] / name, workdir["tokens"]
    index = TokenIndex.load(tokens)
    torch.manual_seed(seed)
    # An untied output layer: with random tied embeddings greedy decoding repeats its input token.
    lm = build_model(ModelArgs(index.vocab_size, 2, 4, 2, 64, 192, CONTEXT, tie_embeddings=False))
    with torch.no_grad():  # the special tokens' logits are 0: greedy text runs to max_tokens, never ends early
        lm.lm_head.weight[sorted(set(index.special_ids().values()) | set(special_ids(tokens)))] = 0
    save_model(lm, root / "pretrain", extra=index.special_ids())
    if task == "sft":
        meta = {"task": "sft", "tokenizer_config": ChatFormat.load(tokens).config, "system_prompt": None,
                "finetune": {"data": "sft.jsonl", "max_steps": 0, "lr": 0.0, "packing": False, "lora": None}}
        save_model(lm, root / "finetune", extra={**index.special_ids(), **meta})
        data = workdir["root"] / "sft-data"
    else:
        data = workdir["root"] / "classify-data"
        labels = json.loads((data / "labels.json").read_text())
        save_model(SequenceClassifier(lm, len(labels)), root / "finetune",
                   extra={"task": "classify", **index.special_ids(), "labels": labels})
    (root / "export").mkdir()
    export(task, root / "finetune", root / "pretrain", tokens, data, out_dir=root / "export")
    return root / "export"


def special_ids(tokens: Path) -> list[int]:
    from lm.config import SPECIAL_TOKENS
    from lm.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokens / "tokenizer.json")
    return [i for t in SPECIAL_TOKENS if (i := tokenizer.token_to_id(t)) is not None]


@contextmanager
def serving(model: str | Path, **options) -> Iterator[Server]:
    """``lmforge serve`` in this process (uvicorn in a thread) on a free port of 127.0.0.1."""
    if isinstance(model, Path):
        options.setdefault("served_model_name", "chat")
    fields = Limits.__dataclass_fields__
    limits = Limits(**{k: options.pop(k) for k in list(options) if k in fields})
    server = Server(ServeOptions(model=str(model), port=0, limits=limits, log_level="warning", **options))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def metric(server: Server, name: str) -> dict[tuple, float]:
    """The samples of one metric on /metrics: {labels (sorted items, 'le' included): value}."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def register(uri: str, name: str, folder: Path, work: Path) -> str:
    """Register an export folder as lmforge's registry does (a pyfunc model whose artifact "model" is
    the folder) -> its version."""
    import mlflow
    from mlflow import MlflowClient

    client_ = MlflowClient(tracking_uri=uri)
    try:
        experiment = client_.create_experiment("serve", artifact_location=(work / "artifacts").as_uri())
    except mlflow.exceptions.MlflowException:
        experiment = client_.get_experiment_by_name("serve").experiment_id
    model_dir = work / f"pyfunc-{folder.parent.name}"
    mlflow.pyfunc.save_model(str(model_dir), python_model=str(ROOT / "lm" / "tracking" / "pyfunc_model.py"),
                             artifacts={"model": str(folder)}, code_paths=[str(ROOT / "lm")], pip_requirements=[])
    run = client_.create_run(experiment)
    client_.log_artifacts(run.info.run_id, str(model_dir), "model")
    client_.set_terminated(run.info.run_id)
    try:
        client_.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    return str(client_.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version)


# ---- real server processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the server did not answer at {url}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to the process (as ``kill PID`` or systemd's KillMode=mixed send it), then to what it
    started and left behind (its process group), SIGKILL to what lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            break
    proc.wait(timeout=10)


@contextmanager
def mlflow_server(store: Path, port: int, log: Path) -> Iterator[subprocess.Popen]:
    """A real ``mlflow server`` on 127.0.0.1:port over a sqlite store; stopped at the end."""
    mlflow = Path(sys.executable).parent / "mlflow"
    with log.open("a") as out:
        proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=store, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}", proc, log, timeout=240)
        yield proc
    finally:
        stop_process(proc)
