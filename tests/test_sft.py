"""Instruction tuning (finetune.task=sft): data, chat template and loss mask, packing, LoRA,
chrF and the baseline, and the method end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import make_token_dir, tiny_config_yaml

from lm.config import SPECIAL_TOKENS, Config, FinetuneConfig, SFTConfig, load_config
from lm.data.instruct import QUESTIONS, build_instruct_data, read_split, stdlib_instructions
from lm.errors import ConfigError, DataError
from lm.finetune import sft
from lm.finetune.lora import apply_lora, merge_lora
from lm.models.folder import build_model
from lm.models.transformer import ModelArgs
from lm.text.chat import CHATML, IM_END, PLAIN_TEXT, ChatFormat, render_chat, tokenizer_config
from lm.text.tokenizer import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye."},
]
PACKAGES = {"json", "textwrap", "shlex", "glob", "fnmatch", "string", "base64", "csv"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def build(tmp_path: Path, data: Path, **keys) -> tuple[dict, Path]:
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config(finetune=FinetuneConfig(task="sft", data=str(data), sft=SFTConfig(**keys)))
    return build_instruct_data(cfg, out_dir=out).metrics, out


def pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(n)]


def chatml_format() -> ChatFormat:
    tok = byte_tokenizer(list(SPECIAL_TOKENS))
    return ChatFormat(tok, tokenizer_config(tok, SPECIAL_TOKENS))


# ---- data -----------------------------------------------------------------------------------------


def test_prompt_response_rows_become_conversations_split_deterministically(tmp_path):
    rows = pairs(120) + [{"prompt": "Empty?", "response": "  "}, {"prompt": "", "response": "x"}, pairs(1)[0]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    metrics, out = build(tmp_path, data, system_prompt="Answer in one sentence.")
    assert metrics["finetune_data/skipped_empty_response"] == 1
    assert metrics["finetune_data/skipped_empty_prompt"] == 1
    assert metrics["finetune_data/skipped_duplicate"] == 1
    assert sum(metrics[f"finetune_data/{s}"] for s in ("train", "val", "test")) == 120
    train = read_split(out, "train")
    assert train[0][0] == {"role": "system", "content": "Answer in one sentence."}
    assert [m["role"] for m in train[0]] == ["system", "user", "assistant"]
    test = {c[1]["content"] for c in read_split(out, "test")}
    assert test.isdisjoint(c[1]["content"] for c in train)
    again = tmp_path / "again"
    again.mkdir()
    build_instruct_data(
        Config(finetune=FinetuneConfig(task="sft", data=str(data), sft=SFTConfig(system_prompt="Answer in one sentence."))),
        out_dir=again,
    )
    for split in ("train", "val", "test"):
        assert pq.read_table(out / f"{split}.parquet").equals(pq.read_table(again / f"{split}.parquet"))


def test_messages_in_jsonl_parquet_and_csv_give_the_same_splits(tmp_path):
    conversations = [
        [{"role": "user", "content": f"Name {i}?"}, {"role": "assistant", "content": f"Number {i}."}]
        for i in range(60)
    ]
    conversations.append(TWO_TURNS)
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c, "id": i} for i, c in enumerate(conversations)])
    parquet = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": conversations}).to_parquet(parquet)
    csv = tmp_path / "chat.csv"
    pd.DataFrame({"messages": [json.dumps(c) for c in conversations]}).to_csv(csv, index=False)
    pr_csv = tmp_path / "pairs.csv"
    pd.DataFrame({"q": [c[0]["content"] for c in conversations[:60]], "a": [c[1]["content"] for c in conversations[:60]]}).to_csv(pr_csv, index=False)
    pr_parquet = tmp_path / "pairs.parquet"
    pd.read_csv(pr_csv).to_parquet(pr_parquet)

    tables = []
    for i, path in enumerate([jsonl, parquet, csv]):
        _, out = build(tmp_path / f"m{i}", path)
        tables.append([pq.read_table(out / f"{s}.parquet") for s in ("train", "val", "test")])
    assert all(t[0].equals(tables[0][0]) and t[2].equals(tables[0][2]) for t in tables)
    assert TWO_TURNS in [c for s in ("train", "val", "test") for c in read_split(tmp_path / "m0" / "out", s)]
    pair_tables = []
    for i, path in enumerate([pr_csv, pr_parquet]):
        _, out = build(tmp_path / f"p{i}", path, prompt_column="q", response_column="a")
        pair_tables.append(pq.read_table(out / "train.parquet"))
    assert pair_tables[0].equals(pair_tables[1])
    # A prompt/response row is the same conversation as its messages row.
    assert pair_tables[0].num_rows == sum(1 for c in read_split(tmp_path / "m0" / "out", "train") if c != TWO_TURNS)


@pytest.mark.parametrize(
    "rows, keys, message",
    [
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
             {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
            {},
            r"data.jsonl, line 2: message 1 has the role 'bot'; the allowed roles are system, user, assistant",
        ),
        ([{"text": "a", "label": "b"}], {}, r"has neither a 'messages' column .* its columns are: text, label"),
        ([{"question": "a", "answer": "b"}], {"prompt_column": "question"}, r"its columns are: question, answer"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], {}, r"data.jsonl, line 2: not valid JSON"),
        (['["a", "b"]'], {}, r"line 1: a record must be a JSON object"),
        ([{"messages": "not a list"}], {}, r"line 1: column 'messages' is not a JSON list of messages"),
        ([{"messages": [{"role": "user"}]}], {}, r"line 1: message 0 must be an object with a role and a content"),
        (pairs(3), {}, r"split of finetune.data=.* is empty \(3 usable examples\); use more data"),
    ],
    ids=["unknown-role", "no-columns", "renamed-column-missing", "bad-json", "not-an-object", "messages-not-list",
         "message-without-content", "too-few"],
)
def test_bad_input_names_the_file_the_line_and_what_to_do(tmp_path, rows, keys, message):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match=message):
        build(tmp_path, data, **keys)


def test_examples_that_teach_nothing_are_skipped_and_counted(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(40)]
    rows += [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}]},
    ]
    metrics, out = build(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows))
    assert metrics["finetune_data/skipped_no_assistant_turn"] == 2
    assert metrics["finetune_data/skipped_empty_response"] == 1
    everything = [c for s in ("train", "val", "test") for c in read_split(out, s)]
    assert len(everything) == 41
    assert [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] in everything  # trailing turn cut


def test_stdlib_task_asks_what_a_function_does_and_answers_with_its_summary():
    found = dict(stdlib_instructions({"json"}))
    dumps = next(p for p in found if "`json.dumps(obj, *, skipkeys=False" in p)
    assert found[dumps] == "Serialize ``obj`` to a JSON formatted ``str``."
    assert any(dumps == q.format(call=dumps.split("`")[1]) for q in QUESTIONS)
    assert len({p.split("`")[0] for p in found}) > 1  # the phrasings vary
    assert all("`json." in p and "._" not in p.split("`")[1] for p in found)  # public names only
    assert all(len(a) <= 160 for a in found.values())


@pytest.mark.slow  # parses the whole standard library (~6 s)
def test_stdlib_stage_output(tmp_path):
    metrics, out = build(tmp_path, Path("stdlib"))
    assert metrics["finetune_data/train"] > 2000 and metrics["finetune_data/test"] > 300
    first = read_split(out, "test")[0]
    assert [m["role"] for m in first] == ["user", "assistant"]


# ---- chat template and loss mask -------------------------------------------------------------------


def test_chatml_template_renders_the_expected_text():
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
        "<|im_start|>assistant\nBye.<|im_end|>\n"
    )
    assert render_chat(CHATML, TWO_TURNS) == expected
    assert render_chat(CHATML, TWO_TURNS[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_tokenizer_without_chatml_tokens_gets_the_plain_text_template_or_its_own():
    tok = byte_tokenizer(["<|endoftext|>", "<|pad|>"])
    config = tokenizer_config(tok, ["<|endoftext|>", "<|pad|>"])
    assert config["chat_template"] == PLAIN_TEXT and config["bos_token"] is None
    assert ChatFormat(tok, config).render(TWO_TURNS[1:3]) == "### user\nHi?\n\n### assistant\nHello.<|endoftext|>\n\n"
    own = {"chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"}]}
    assert tokenizer_config(tok, ["<|endoftext|>"], own)["chat_template"] == "{{ messages[0]['content'] }}"
    tok_chatml = byte_tokenizer(list(SPECIAL_TOKENS))
    assert tokenizer_config(tok_chatml, SPECIAL_TOKENS)["chat_template"] == CHATML


def test_the_loss_mask_labels_exactly_the_assistant_contents_and_their_end_tokens():
    fmt = chatml_format()
    ids, assistant = fmt.encode(TWO_TURNS)
    tok = fmt.tokenizer
    assert tok.decode(ids, skip_special_tokens=False) == render_chat(CHATML, TWO_TURNS)
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello.<|im_end|>", True),
        ("\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Bye.<|im_end|>", True),
        ("\n", False),
    ]
    expected = [(i, flag) for text, flag in pieces for i in tok.encode(text, add_special_tokens=False).ids]
    assert list(zip(ids, assistant, strict=True)) == expected
    im_end = tok.token_to_id(IM_END)
    assert [ids[i] for i, a in enumerate(assistant) if a].count(im_end) == 2
    # As training targets (shifted by one): what is predicted is exactly those tokens.
    examples = sft.encode_examples(fmt, [TWO_TURNS], seq_len=200)
    (x, y), = examples.items
    assert y[y != -100].tolist() == [i for i, a in zip(ids, assistant, strict=True) if a]
    assert examples.truncated == examples.skipped == 0
    # The prompt of the last turn is encoded as in training.
    prompt, _ = fmt.encode(TWO_TURNS[:-1], add_generation_prompt=True)
    assert prompt == ids[: len(prompt)] and assistant[len(prompt)]


def test_long_conversations_are_truncated_and_counted_and_prompt_only_ones_skipped():
    fmt = chatml_format()
    long_answer = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "word " * 50}]
    long_prompt = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "Yes."}]
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    examples = sft.encode_examples(fmt, [long_answer, long_prompt, short], seq_len=64)
    assert (examples.truncated, examples.skipped, len(examples.items)) == (2, 1, 2)
    assert all(len(x) <= 64 for x, _ in examples.items)


def test_a_packed_example_attends_only_to_itself():
    torch.manual_seed(0)
    net = build_model(ModelArgs(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, seq_len=48)).eval()
    fmt = chatml_format()
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [("Hi", "Hey"), ("Yo?", "No."), ("x", "y")]]
    items = sft.encode_examples(fmt, convs, seq_len=48).items
    windows = sft.pack(items, 48, pad_id=1)
    assert len(windows) < len(items)  # some share a window
    ids, targets, doc = (torch.stack(p) for p in zip(*windows, strict=True))
    with torch.no_grad():
        packed = net(ids, document_ids=doc)[0]
        for w, (_, _, d) in enumerate(windows):
            for k in range(1, int(d.max()) + 1):
                pos = (d == k).nonzero().flatten()
                alone = net(ids[w, pos][None])[0][0]
                torch.testing.assert_close(packed[w, pos], alone, atol=1e-5, rtol=1e-5)
    assert sum(int((t != -100).sum()) for _, t, _ in windows) == sum(int((y != -100).sum()) for _, y in items)


# ---- LoRA -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_dirs(tmp_path_factory):
    """A token dir (real tokenize stage) and sft data from a few stdlib modules' functions."""
    tmp = tmp_path_factory.mktemp("sft")
    tokens = make_token_dir(tmp / "tokens")
    rows = [{"prompt": p, "response": r} for p, r in stdlib_instructions(PACKAGES)]
    data = write_jsonl(tmp / "sft.jsonl", rows)
    out = tmp / "ft_data"
    out.mkdir()
    build_instruct_data(Config(finetune=FinetuneConfig(task="sft", data=str(data))), out_dir=out)
    return {"tokens": tokens, "data": out, "jsonl": data, "tmp": tmp}


def tiny_sft_config(tmp_path: Path, sft_dirs, **finetune):
    return load_config(
        tiny_config_yaml(
            tmp_path / "cfg.yaml",
            model={"preset": "tiny", "seq_len": 64},
            finetune={"task": "sft", "data": str(sft_dirs["jsonl"]), "max_steps": 6, "val_every": 3,
                      "ckpt_every": 3, **finetune},
            deploy={"promote_metric": "eval/chrf", "promote_mode": "max"},
        )
    )


def test_lora_trains_only_the_adapters_and_merges_to_the_same_function(tmp_path, sft_dirs):
    from lm.text.shards import TokenIndex

    cfg = tiny_sft_config(tmp_path, sft_dirs, lr=1e-2, warmup_steps=0, **{"lora": {"enabled": True, "r": 4, "dropout": 0.0,
                          "target_modules": ["q_proj", "v_proj", "down_proj"]}})
    args = ModelArgs(TokenIndex.load(sft_dirs["tokens"]).vocab_size, 2, 4, 2, 64, 192, 64)
    torch.manual_seed(0)
    recipe = sft.build(cfg, build_model(args).train(), sft_dirs["data"], sft_dirs["tokens"])
    net, module = recipe.module.net, recipe.module
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert all(("lora_" in n) == p.requires_grad for n, p in net.named_parameters())
    optimizer = module.configure_optimizers()["optimizer"]
    recipe.datamodule.setup()
    batches = iter(recipe.datamodule.train_dataloader())
    for _ in range(3):
        optimizer.zero_grad()
        module.batch_loss(next(batches)).backward()
        optimizer.step()
    after = net.state_dict()
    for name, value in before.items():
        if "lora_" in name:
            assert not torch.equal(value, after[name]), f"adapter {name} did not train"
        else:
            assert torch.equal(value, after[name]), f"base parameter {name} changed"
    merged = merge_lora(net).eval()
    assert set(merged.state_dict()) == set(build_model(args).state_dict())  # a plain Decoder again
    ids = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids)[0], net.eval()(ids)[0], atol=1e-5, rtol=1e-5)


def test_lora_on_a_missing_layer_is_a_config_error():
    from lm.config import LoraConfig

    net = build_model(ModelArgs(100, 1, 2, 2, 16, 32, 8))
    with pytest.raises(ConfigError, match=r"target_modules=\['qkv'\].*named down_proj, gate_proj, k_proj"):
        apply_lora(net, LoraConfig(enabled=True, target_modules=["qkv"]))


@pytest.mark.slow  # ~40 s: four training processes
def test_lora_finetuning_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, sft_dirs):
    from test_resume import final_metrics
    from train_fixtures import finetune_args, kill_at_checkpoint, pretrain_args, run_training

    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        model={"preset": "tiny", "seq_len": 64},
        pretrain={"max_steps": 4},
        finetune={"task": "sft", "data": str(sft_dirs["jsonl"]), "max_steps": 16, "ckpt_every": 4,
                  "val_every": 8, "batch_size": 4, "lora": {"enabled": True, "r": 4, "dropout": 0.1}},
    )
    tokens, data = sft_dirs["tokens"], sft_dirs["data"]
    run_training(pretrain_args(cfg, tokens, tmp_path / "pre"))
    run_training(finetune_args(cfg, data, tokens, tmp_path / "pre", tmp_path / "ref"))
    expected = final_metrics(tmp_path / "ref")
    kill_at_checkpoint(finetune_args(cfg, data, tokens, tmp_path / "pre", tmp_path / "crashed"), 12)
    ckpt = torch.load(tmp_path / "crashed" / "checkpoints" / "step-00000012.ckpt", weights_only=True)
    assert any("lora_A" in k for k in ckpt["state_dict"])  # the checkpoint holds the adapters
    resumed = run_training(finetune_args(cfg, data, tokens, tmp_path / "pre", tmp_path / "crashed"))
    assert "resuming from" in resumed.stdout and "not resumable" not in resumed.stderr
    got = final_metrics(tmp_path / "crashed")
    assert got["steps"] == expected["steps"] == 16
    assert got["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-6)
    assert got["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-6)
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("ref", "crashed")]
    assert weights[0] == weights[1]


# ---- metrics ----------------------------------------------------------------------------------------


def test_chrf_on_known_pairs():
    assert sft.chrf(["Return the JSON string."], ["Return the JSON string."]) == pytest.approx(100.0)
    assert sft.chrf(["abc"], ["xyz"]) == 0.0
    # By hand, orders 1-2: P = (2/2 + 1/1) / 2 = 1, R = (2/3 + 1/2) / 2 = 7/12, F2 = 5PR / (4P + R) = 35/55.
    assert sft.chrf(["ab"], ["abc"], order=2) == pytest.approx(100 * 35 / 55)
    assert sft.chrf(["a b"], ["ab"], order=2) == pytest.approx(100.0)  # whitespace does not count
    assert sft.chrf(["", "abc"], ["abc", "abc"], order=1) == pytest.approx(100 * 5 * 1 * 0.5 / (4 + 0.5))  # corpus sums


def test_the_nearest_neighbour_baseline_answers_with_the_most_similar_training_prompt():
    def conv(q: str, a: str) -> list[dict]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    train = [conv("What does json.dumps do?", "Serialize."), conv("What does os.path.join do?", "Join paths."),
             conv("What does zipfile.ZipFile.open do?", "Open a member.")]
    prompts = [[{"role": "user", "content": "Explain os.path.join(a, *p)"}], [{"role": "user", "content": "json.dumps?"}]]
    assert sft.nearest_neighbour_responses(train, prompts) == ["Join paths.", "Serialize."]
    assert sft.normalised("  Join\n PATHS. ") == "join paths."


def test_the_demo_config_is_sft_and_its_promotion_metric_is_known():
    from lm.stages import _check_promote_metric

    cfg = load_config("default")
    assert cfg.finetune.task == "sft" and cfg.deploy.promote_metric == "eval/chrf"
    _check_promote_metric(cfg)


# ---- end to end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_sft_trains_evaluates_exports_and_answers(tmp_path, sft_dirs, packing):
    from transformers import AutoTokenizer

    from lm.pipeline.export import export
    from lm.training.child import run_finetune, run_pretrain

    cfg = tiny_sft_config(tmp_path, sft_dirs, max_steps=20, lr=3e-3, sft={"packing": packing})
    tokens, data = sft_dirs["tokens"], sft_dirs["data"]
    run_pretrain(cfg, tokens, tmp_path / "pre")
    metrics = run_finetune(cfg, data, tokens, tmp_path / "pre", tmp_path / "ft")
    assert metrics["steps"] == 20 and metrics["val/loss"] < 6
    (tmp_path / "eval").mkdir()
    t0 = time.perf_counter()
    ev = sft.evaluate(tmp_path / "ft", data, tokens / "tokenizer.json", base_dir=tmp_path / "pre", out_dir=tmp_path / "eval",
                      settings=cfg.evaluate.model_copy(update={"generate_prompts": 4, "max_new_tokens": 8}))
    assert time.perf_counter() - t0 < 30
    assert ev["eval/response_loss"] < ev["eval/base_response_loss"]  # tuning taught the responses
    assert set(sft.METRICS) <= set(ev) and 0 <= ev["eval/chrf"] <= 100 and 0 <= ev["eval/rouge_l"] <= 100
    generations = pd.read_csv(tmp_path / "eval" / "generations.csv")
    assert list(generations.columns) == ["prompt", "reference", "response", "baseline_response", "chrf", "rouge_l"]
    assert len(generations) == 4

    (tmp_path / "export").mkdir()
    result = export("sft", tmp_path / "ft", tmp_path / "pre", tokens, data, out_dir=tmp_path / "export")
    assert {"tokenizer_config.json", "hf"} <= set(result.artifacts)
    predictor = sft.Predictor(tmp_path / "export")
    out = predictor.predict(
        pd.DataFrame({"prompt": ["What does `json.dumps(obj)` do?", "What does `glob.glob(pathname)` do?"]}),
        {"max_new_tokens": 6, "temperature": 0.0},
    )
    assert list(out.columns) == ["response", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert (out["completion_tokens"] > 0).all() and out["response"].str.len().gt(0).all()
    chat = predictor.predict(pd.DataFrame({"messages": [TWO_TURNS[:2]]}), {"max_new_tokens": 3, "temperature": 1.0, "seed": 1})
    assert chat["completion_tokens"][0] <= 3
    with pytest.raises(DataError, match="unknown params"):
        predictor.predict(predictor.input_example(), {"beams": 4})
    # Hugging Face tools render the exported chat template as we do.
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "export" / "hf")
    assert hf_tok.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True) == render_chat(
        CHATML, TWO_TURNS[:2], add_generation_prompt=True
    )
    assert hf_tok.eos_token == IM_END
    card = (tmp_path / "export" / "hf" / "README.md").read_text()
    assert "vllm serve ./hf" in card and str(tmp_path) not in card


@pytest.fixture(scope="module")
def sft_pipeline(prefect_harness, tmp_path_factory) -> dict:
    """~2 min: the whole tiny sft pipeline through Prefect and MLflow, once for the tests that read it."""
    from flows.pipeline import pipeline

    tmp_path = tmp_path_factory.mktemp("sft-pipeline")
    cfg = load_config(
        "tiny",
        [f"workdir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "model.seq_len=128",
         "finetune.task=sft", "finetune.max_steps=20", "finetune.lora.enabled=true", "evaluate.generate_prompts=8",
         "evaluate.max_new_tokens=16", "deploy.promote_metric=eval/chrf", "deploy.model_name=lmforge-tiny-sft"],
    )
    return pipeline(config=cfg)


@pytest.mark.slow
def test_the_pipeline_runs_sft_and_logs_its_metrics_and_generations(sft_pipeline):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lm.tracking.runs import run_tree

    out = sft_pipeline
    tree = run_tree(out["tracking_uri"], out["mlflow_run_id"])
    assert tree["parent"].info.status == "FINISHED"
    evaluate = tree["children"]["evaluate"]
    for key in ("eval/response_loss", "eval/base_response_loss", "eval/response_ppl", "eval/chrf", "eval/baseline_chrf",
                "eval/rouge_l", "eval/baseline_rouge_l", "eval/exact_match", "eval/baseline_exact_match", "eval/bpb"):
        assert key in evaluate.data.metrics, key
    client = MlflowClient(out["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"generations.csv", "generations.json"} <= logged, logged  # the file and its table view
    data = tree["children"]["finetune_data"].data.metrics
    assert data["finetune_data/train"] > 1000 and "finetune_data/skipped_empty_response" in data
    mlflow.set_tracking_uri(out["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/lmforge-tiny-sft@champion")
    answers = model.predict(pd.DataFrame({"prompt": ["What does `json.loads(s)` do?"]}))
    assert list(answers.columns) == ["response", "finish_reason", "prompt_tokens", "completion_tokens"]
    # Generation params pass through the registered model's signature.
    short = model.predict(pd.DataFrame({"prompt": ["What does `json.loads(s)` do?"]}), params={"max_new_tokens": 2})
    assert short["completion_tokens"][0] <= 2
    assert (Path(out["export"]) / "hf" / "config.json").is_file()
    # The model card says how the model scored and which MLflow run made it.
    card = (Path(out["export"]) / "hf" / "README.md").read_text()
    assert "| `eval/chrf` |" in card and tree["children"]["export"].info.run_id in card


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champion_generator(sft_pipeline, tmp_path):
    from scoring_server import invoke, mlflow_models_serve

    out = sft_pipeline
    prompts = ["What does `json.loads(s)` do?", "What does `shlex.split(s)` do?"]
    with mlflow_models_serve("models:/lmforge-tiny-sft@champion", out["tracking_uri"], tmp_path / "serve.log") as url:
        records = invoke(url, {"dataframe_records": [{"prompt": p} for p in prompts], "params": {"max_new_tokens": 4}})
        split = invoke(url, {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in prompts]},
                             "params": {"max_new_tokens": 4}})
        longer = invoke(url, {"dataframe_records": [{"prompt": prompts[0]}], "params": {"max_new_tokens": 12}})
    rows = records["predictions"]
    assert len(rows) == 2 and split == records, (rows, split)  # greedy by default: the same answers
    for row in rows:
        assert isinstance(row["response"], str) and row["finish_reason"] in ("stop", "length")
        assert row["completion_tokens"] <= 4 and row["prompt_tokens"] > 0
    # The params reach the model: more tokens allowed, at least as many written.
    assert longer["predictions"][0]["completion_tokens"] >= rows[0]["completion_tokens"]


def test_a_mix_of_sources_builds_and_model_json_names_each_file_not_its_path(tmp_path, sft_dirs):
    from lm.text.shards import TokenIndex

    other = write_jsonl(tmp_path / "more.jsonl", [{"prompt": "Say hi.", "response": "Hi."}] * 3)
    cfg = tiny_sft_config(tmp_path, sft_dirs, data=[{"path": str(sft_dirs["jsonl"]), "weight": 2}, str(other)])
    args = ModelArgs(TokenIndex.load(sft_dirs["tokens"]).vocab_size, 2, 4, 2, 64, 192, 64)
    recipe = sft.build(cfg, build_model(args).train(), sft_dirs["data"], sft_dirs["tokens"])
    assert recipe.meta["finetune"]["data"] == [{"path": "sft.jsonl", "weight": 2.0}, {"path": "more.jsonl", "weight": 1.0}]
    assert str(tmp_path) not in json.dumps(recipe.meta)
