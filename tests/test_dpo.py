"""Preference tuning (finetune.task=dpo): preference files in their common forms, the reply mask,
the loss against TRL's, learning a toy preference, the stored reference, resume, DDP, and the
pipeline from a preference file to a registered chat model (also from a registered champion)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import finetune_args, make_token_dir, run_training, tiny_config_yaml

from lm.config import SPECIAL_TOKENS, Config, DPOConfig, FinetuneConfig, load_config
from lm.data.preference import build_preference_data, read_preference_split
from lm.errors import ConfigError, DataError
from lm.finetune import dpo
from lm.text.chat import ChatFormat, tokenizer_config
from lm.text.tokenizer import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def toy_pairs(n: int) -> list[dict]:
    """A style preference a tiny model learns in seconds: a polite reply over a rude one, to held-out numbers."""
    return [{"prompt": f"Give me the number {i}.", "chosen": f"Here it is: {i}. Thank you!", "rejected": f"No. {i} go away"}
            for i in range(n)]


def build(tmp_path: Path, data: Path, **keys) -> tuple[dict, Path]:
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config(finetune=FinetuneConfig(task="dpo", data=str(data), dpo=DPOConfig(**keys)))
    return build_preference_data(cfg, out_dir=out).metrics, out


def canonical(pairs) -> list[str]:
    return sorted(json.dumps(p, sort_keys=True) for p in pairs)


def all_pairs(out: Path) -> list:
    return [p for s in ("train", "val", "test") for p in read_preference_split(out, s)]


# ---- data -----------------------------------------------------------------------------------------


def test_every_common_form_of_a_preference_record_gives_the_same_pairs(tmp_path):
    asks = [(f"What is {i} + {i}?", f"{2 * i}.", f"{2 * i + 1}.") for i in range(40)]
    forms = {
        "text.jsonl": [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in asks],
        # UltraFeedback-binarized: the prompt text beside two whole conversations.
        "ultrafeedback.jsonl": [{"prompt": q, "chosen": [user(q), assistant(c)], "rejected": [user(q), assistant(r)],
                                 "score_chosen": 9.0} for q, c, r in asks],
        # Anthropic HH as TRL ships it: two whole conversations, no prompt.
        "conversations.jsonl": [{"chosen": [user(q), assistant(c)], "rejected": [user(q), assistant(r)]} for q, c, r in asks],
        # The prompt as messages, the replies alone.
        "replies.jsonl": [{"prompt": [user(q)], "chosen": [assistant(c)], "rejected": [assistant(r)]} for q, c, r in asks],
        # Anthropic HH's original text transcripts.
        "transcripts.jsonl": [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
                              for q, c, r in asks],
    }
    expected = canonical(([user(q)], [assistant(c)], [assistant(r)]) for q, c, r in asks)
    for name, rows in forms.items():
        metrics, out = build(tmp_path / f"d-{name}", write_jsonl(tmp_path / name, rows))
        assert canonical(all_pairs(out)) == expected, name
        assert sum(metrics[f"finetune_data/{s}"] for s in ("train", "val", "test")) == 40
    # The containers read_records reads: parquet (messages as lists), CSV (messages as JSON text).
    frame = pd.DataFrame(forms["conversations.jsonl"])
    frame.to_parquet(tmp_path / "c.parquet")
    frame.map(json.dumps).to_csv(tmp_path / "c.csv", index=False)
    jsonl_train = pq.read_table(tmp_path / "d-conversations.jsonl" / "out" / "train.parquet")
    for name in ("c.parquet", "c.csv"):
        _, out = build(tmp_path / f"d-{name}", tmp_path / name)
        assert pq.read_table(out / "train.parquet").equals(jsonl_train), name


def test_a_dialogue_keeps_its_earlier_turns_as_the_prompt_and_a_system_prompt_is_added(tmp_path):
    def history(i: int) -> list[dict]:
        return [user(f"Hi {i}"), assistant("Hello."), user("Name a colour.")]

    rows = [{"chosen": [*history(i), assistant("Blue.")], "rejected": [*history(i), assistant("No.")]} for i in range(30)]
    _, out = build(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), system_prompt="Be kind.")
    prompt, chosen, rejected = all_pairs(out)[0]
    assert prompt[0] == {"role": "system", "content": "Be kind."} and prompt[1:] == history(int(prompt[1]["content"][3:]))
    assert (chosen, rejected) == ([assistant("Blue.")], [assistant("No.")])


def test_pairs_that_cannot_teach_are_skipped_and_counted_per_reason(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    rows += [
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # identical_responses
        {"prompt": "q", "chosen": "good", "rejected": "  "},  # empty_response
        {"prompt": "", "chosen": "good", "rejected": "bad"},  # empty_prompt
        rows[0],  # duplicate
    ]
    conversations = [
        {"prompt": None, "chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},  # different_prompts
        {"prompt": None, "chosen": [user("a"), user("more"), assistant("x")], "rejected": [user("a"), assistant("y")]},
    ]
    metrics, out = build(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows + conversations))
    skipped = {k.removeprefix("finetune_data/skipped_"): v for k, v in metrics.items() if "skipped" in k}
    assert skipped == {"empty_prompt": 1, "different_prompts": 1, "empty_response": 1, "not_a_reply": 1,
                       "identical_responses": 1, "duplicate": 1}
    assert len(all_pairs(out)) == 40


def test_the_split_goes_by_prompt_so_no_test_prompt_is_trained_on(tmp_path):
    rows = [{"prompt": f"q{i // 3}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(150)]
    _, out = build(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows))
    prompts = {s: {p[0][-1]["content"] for p in read_preference_split(out, s)} for s in ("train", "val", "test")}
    assert prompts["train"].isdisjoint(prompts["test"]) and prompts["train"].isdisjoint(prompts["val"])


@pytest.mark.parametrize(
    "rows, keys, message",
    [
        ([{"prompt": "a", "good": "b", "bad": "c"}], {},
         r"p.jsonl has no 'chosen' and no 'rejected' column; its columns are: prompt, good, bad. Set finetune.dpo"),
        ([{"prompt": "a", "good": "b", "rejected": "c"}], {"chosen_column": "better"}, r"no 'better' column"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": [assistant("b")], "rejected": "c"}], {},
         r"p.jsonl, line 2: 'chosen' and 'rejected' must both be text or both be chat messages"),
        ([{"chosen": [user("a"), {"role": "bot", "content": "b"}], "rejected": [user("a"), assistant("c")]}], {},
         r"p.jsonl, line 1: message 1 has the role 'bot'; the allowed roles are system, user, assistant"),
        ([{"prompt": "a", "chosen": {"text": "b"}, "rejected": "c"}], {}, r"line 1: chosen must be text, not dict"),
        (['{"prompt": "a", "chosen": "b", "rejected": '], {}, r"p.jsonl, line 1: not valid JSON"),
        (toy_pairs(3), {}, r"split of finetune.data=.* is empty \(3 usable pairs\); use more data"),
    ],
    ids=["no-columns", "renamed-column-missing", "text-and-messages", "unknown-role", "not-text", "bad-json", "too-few"],
)
def test_a_bad_preference_file_is_named_with_its_first_bad_record(tmp_path, rows, keys, message):
    with pytest.raises(DataError, match=message):
        build(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows), **keys)


def test_a_folder_or_glob_of_preference_files_reads_as_one_file_and_a_mix_is_refused(tmp_path):
    rows = toy_pairs(40)
    one, _ = build(tmp_path / "one", write_jsonl(tmp_path / "all.jsonl", rows))
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "a.jsonl", rows[:25])
    write_jsonl(parts / "b.jsonl", rows[25:])
    for given in (parts, parts / "*.jsonl"):
        metrics, out = build(tmp_path / given.name.replace("*", "glob"), given)
        assert metrics == one and canonical(all_pairs(out)) == canonical(all_pairs(tmp_path / "one" / "out"))
    with pytest.raises(ConfigError, match="a list of sources .* finetune.task=dpo does not take"):
        load_config("tiny", ["finetune.task=dpo", f"finetune.data=[{{path: {parts / 'a.jsonl'}}}]"])


def test_the_stdlib_task_is_not_a_preference_set_and_ipo_has_no_label_smoothing(tmp_path):
    with pytest.raises(DataError, match="finetune.task=dpo needs preference pairs: set finetune.data"):
        build_preference_data(Config(finetune=FinetuneConfig(task="dpo")), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="label_smoothing is conservative DPO's"):
        load_config("tiny", ["finetune.task=dpo", "finetune.dpo.loss=ipo", "finetune.dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"finetune.dpo.loss"):
        load_config("tiny", ["finetune.task=dpo", "finetune.dpo.loss=hinge"])


# ---- the reply mask --------------------------------------------------------------------------------


def chatml_format() -> ChatFormat:
    tok = byte_tokenizer(list(SPECIAL_TOKENS))
    return ChatFormat(tok, tokenizer_config(tok, SPECIAL_TOKENS))


def test_the_targets_are_the_reply_tokens_and_nothing_of_the_prompt():
    fmt = chatml_format()
    prompt = [user("Hi"), assistant("Hello."), user("Colour?")]
    pairs = dpo.encode_pairs(fmt, [(prompt, [assistant("Blue.")], [assistant("No idea, sorry.")])], seq_len=200)
    (cx, cy, rx, ry), = pairs.items
    tok = fmt.tokenizer
    for x, y, reply in ((cx, cy, "Blue."), (rx, ry, "No idea, sorry.")):
        assert tok.decode(y[y != -100].tolist(), skip_special_tokens=False) == reply + "<|im_end|>"
        assert torch.equal(x[1:], torch.where(y[:-1] != -100, y[:-1], x[1:]))  # targets are the next tokens
    # A context that the prompt fills leaves no reply token: skipped; one that cuts a reply: truncated.
    long = [user("word " * 60)]
    cut = dpo.encode_pairs(fmt, [(long, [assistant("a")], [assistant("b")]), ([user("q")], [assistant("x" * 80)], [assistant("y")])], 64)
    assert (cut.skipped, cut.truncated, len(cut.items), cut.kept) == (1, 1, 1, [1])


# ---- the loss, against TRL's ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """Two tiny random Llamas (the policy and the reference) and a batch as TRL's DPOTrainer collates it."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = byte_tokenizer(list(SPECIAL_TOKENS))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).double()  # float64: TRL's chunked LM head and our logits round alike
    reference = LlamaForCausalLM(config).double()
    data = Dataset.from_dict({"prompt": [f"Say {i}." for i in range(6)],
                              "chosen": [f" Here is {i}, friend." for i in range(6)],
                              "rejected": [f" No{'!' * i}" for i in range(6)]})
    return {"policy": policy, "reference": reference, "data": data, "tokenizer": hf_tok,
            "tmp": tmp_path_factory.mktemp("trl")}


def our_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Our sequence log-probabilities of TRL's batch, from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    return dpo.sequence_logps(logits[:, :-1], targets)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_our_dpo_and_ipo_losses_equal_trls_on_the_same_logits(trl_setup, loss):
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    s = trl_setup
    # bf16=False: TRL's default runs the networks under bf16 autocast; the test compares the losses on equal numbers.
    args = TRLConfig(output_dir=str(s["tmp"] / loss), beta=0.3, loss_type=loss, report_to=[], use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=s["policy"], ref_model=s["reference"], args=args, train_dataset=s["data"],
                         processing_class=s["tokenizer"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(s["data"]))])
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    policy, counts = our_logps(s["policy"], batch)
    reference, _ = our_logps(s["reference"], batch)
    losses, chosen, rejected = dpo.preference_loss(policy, reference, counts, loss=loss, beta=0.3)
    assert float(losses.mean()) == pytest.approx(float(theirs), abs=1e-6)
    assert float(theirs) != pytest.approx(float(dpo.preference_loss(reference, reference, counts, loss=loss, beta=0.3)[0].mean()))
    # TRL's logged rewards are ours.
    assert trainer._metrics["train"]["rewards/margins"][-1] == pytest.approx(float((chosen - rejected).mean()), abs=1e-6)


def test_conservative_dpo_equals_trls_label_smoothed_sigmoid_loss(trl_setup):
    """TRL 1.16's DPOTrainer keeps label smoothing for its robust and EXO losses only; its conservative
    sigmoid loss (Mitchell 2023) lives in CPOTrainer.cpo_loss, which on the policy's log-ratios to the
    reference is conservative DPO."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    s = trl_setup
    args = CPOConfig(output_dir=str(s["tmp"] / "cpo"), beta=0.3, loss_type="sigmoid", label_smoothing=0.2,
                     report_to=[], use_cpu=True, bf16=False)
    trainer = CPOTrainer(model=s["policy"], args=args, train_dataset=s["data"], processing_class=s["tokenizer"])
    torch.manual_seed(1)
    policy, reference = torch.randn(12) * 3 - 20, torch.randn(12) * 3 - 20
    ratios = (policy - reference).chunk(2)
    theirs, _, _ = trainer.cpo_loss(*ratios)
    ours, _, _ = dpo.preference_loss(policy, reference, torch.full((12,), 5), beta=0.3, label_smoothing=0.2)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    plain, _, _ = dpo.preference_loss(policy, reference, torch.full((12,), 5), beta=0.3)
    assert not torch.allclose(ours, plain)


def test_a_tie_counts_as_half_so_the_starting_model_scores_one_half():
    zero = torch.zeros(4)
    assert dpo.wins(zero, zero).mean() == 0.5
    assert dpo.wins(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.0]


# ---- training -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A token dir (real tokenize stage), the toy preference set built by the real data stage, a random decoder."""
    from lm.models.folder import build_model, save_model
    from lm.models.transformer import ModelArgs
    from lm.text.shards import TokenIndex

    tmp = tmp_path_factory.mktemp("dpo")
    tokens = make_token_dir(tmp / "tokens")
    data = write_jsonl(tmp / "pairs.jsonl", toy_pairs(300))
    (tmp / "ft_data").mkdir()
    build_preference_data(Config(finetune=FinetuneConfig(task="dpo", data=str(data))), out_dir=tmp / "ft_data")
    torch.manual_seed(0)
    save_model(build_model(ModelArgs(TokenIndex.load(tokens).vocab_size, 2, 4, 2, 64, 192, 64)), tmp / "start")
    return {"tokens": tokens, "data": tmp / "ft_data", "jsonl": data, "start": tmp / "start", "tmp": tmp}


def toy_config(path: Path, toy: dict, trainer: dict | None = None, **finetune) -> Path:
    return tiny_config_yaml(
        path, model={"preset": "tiny", "seq_len": 64}, **({"trainer": trainer} if trainer else {}),
        finetune={"task": "dpo", "data": str(toy["jsonl"]), "max_steps": 40, "val_every": 10, "ckpt_every": 10,
                  "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, **finetune},
    )


def test_training_holds_one_network_the_reference_being_stored_numbers(tmp_path, toy):
    """The reference is not resident: what training holds (the LightningModule and the DataModule)
    reaches one network, the one being tuned; the reference enters as two numbers a pair (the memory
    this saves is measured by benchmarks/dpo_memory.py)."""
    from lm.models.folder import load_model

    cfg = load_config(toy_config(tmp_path / "cfg.yaml", toy))
    recipe = dpo.build(cfg, load_model(toy["start"]), toy["data"], toy["tokens"])
    tuned = {id(p) for p in recipe.module.net.parameters()}
    assert {id(p) for p in recipe.module.parameters()} == tuned  # no second set of weights in the module

    def modules_in(value, depth=0):
        if isinstance(value, torch.nn.Module):
            yield value
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                yield from modules_in(v, depth + 1)
        elif depth < 3 and isinstance(value, (list, tuple)):
            for v in value:
                yield from modules_in(v, depth + 1)

    assert list(modules_in(vars(recipe.datamodule))) == []  # the data holds token ids, no network


@pytest.mark.slow  # ~15 s
def test_a_toy_preference_is_learned_and_the_reference_is_computed_once(tmp_path, toy, capsys):
    from safetensors import safe_open

    from lm.training.child import run_finetune

    cfg = load_config(toy_config(tmp_path / "cfg.yaml", toy))
    metrics = run_finetune(cfg, toy["data"], toy["tokens"], toy["start"], tmp_path / "ft")
    margins = [float(m) for m in re.findall(r"val/rewards/margins (-?[\d.]+)", capsys.readouterr().out)]
    assert len(margins) >= 4 and margins[-1] > margins[0] > 0, margins  # the margin grows
    assert metrics["val/rewards/accuracy"] >= 0.9 and {"val/rewards/chosen", "val/rewards/rejected"} <= set(metrics)
    (tmp_path / "eval").mkdir()
    ev = dpo.evaluate(tmp_path / "ft", toy["data"], toy["tokens"] / "tokenizer.json", base_dir=toy["start"],
                      out_dir=tmp_path / "eval")
    print("toy set, held-out pairs:", {k: round(v, 4) for k, v in ev.items()}, "val margins by step:", margins)
    assert ev["eval/base_rewards/accuracy"] == 0.5  # the reference against itself: every pair a tie
    assert ev["eval/rewards/accuracy"] >= 0.9 and ev["eval/rewards/margins"] > 1.0
    assert ev["eval/preference_loss"] < ev["eval/base_preference_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert ev["eval/rewards/chosen"] > 0 > ev["eval/rewards/rejected"]
    shown = pd.read_csv(tmp_path / "eval" / dpo.PREFERENCES)
    assert len(shown) == ev["eval/test_pairs"] and shown["right"].mean() == ev["eval/rewards/accuracy"]
    # Stored once, in the stage's folder: the starting model's log-probabilities of every train and val pair.
    with safe_open(str(tmp_path / "ft" / dpo.REFERENCE), framework="pt") as f:
        assert set(f.keys()) == {"train", "val"} and f.get_tensor("train").shape[1] == 2  # noqa: SIM118
        train_reference = f.get_tensor("train")
    pairs = dpo.encode_pairs(ChatFormat.load(toy["tokens"]), read_preference_split(toy["data"], "train"), 64)
    from lm.models.folder import load_model

    start = dpo.pair_logps(load_model(toy["start"]), pairs.items, pad_id=int(load_model(tmp_path / "ft").meta["pad_id"]))
    torch.testing.assert_close(train_reference, start, atol=1e-4, rtol=1e-5)


@pytest.mark.slow  # ~45 s: three training processes
def test_lora_dpo_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, toy):
    from test_resume import final_metrics
    from train_fixtures import kill_at_checkpoint

    cfg = toy_config(tmp_path / "cfg.yaml", toy, max_steps=24, ckpt_every=4, val_every=8, batch_size=8,
                     lora={"enabled": True, "r": 4, "dropout": 0.1})
    run_training(finetune_args(cfg, toy["data"], toy["tokens"], toy["start"], tmp_path / "ref"))
    expected = final_metrics(tmp_path / "ref")
    crashed = tmp_path / "crashed"
    kill_at_checkpoint(finetune_args(cfg, toy["data"], toy["tokens"], toy["start"], crashed), 12)
    stored = (crashed / dpo.REFERENCE).stat().st_mtime_ns
    assert any("lora_A" in k for k in torch.load(crashed / "checkpoints" / "step-00000012.ckpt", weights_only=True)["state_dict"])
    resumed = run_training(finetune_args(cfg, toy["data"], toy["tokens"], toy["start"], crashed))
    assert "resuming from" in resumed.stdout and "not resumable" not in resumed.stderr
    assert (crashed / dpo.REFERENCE).stat().st_mtime_ns == stored  # read back, not recomputed
    got = final_metrics(crashed)
    assert got["steps"] == expected["steps"] == 24
    assert got["val/rewards/accuracy"] == expected["val/rewards/accuracy"]
    assert (tmp_path / "ref" / "model.safetensors").read_bytes() == (crashed / "model.safetensors").read_bytes()
    assert (tmp_path / "ref" / "adapter.safetensors").is_file()


@pytest.mark.slow  # ~25 s: two gloo ranks
def test_two_process_ddp_dpo_ranks_agree_and_one_run_holds_the_reward_metrics(tmp_path, toy, tracking_uri):
    import mlflow
    from test_ddp import DIGEST

    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("dpo-ddp")).info.run_id
    cfg = toy_config(tmp_path / "cfg.yaml", toy, max_steps=12, val_every=6, batch_size=8,
                     trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "log_every": 2})
    logged = ("--run-id", run_id, "--tracking-uri", tracking_uri, "--print-weight-digest")
    proc = run_training(finetune_args(cfg, toy["data"], toy["tokens"], toy["start"], tmp_path / "out", *logged))
    digests = dict(DIGEST.findall(proc.stdout + proc.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert "world 2" in proc.stdout
    metrics = client.get_run(run_id).data.metrics
    for key in ("train/loss", "train/rewards/accuracy", "train/rewards/margins", "val/loss", "val/rewards/accuracy",
                "val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins"):
        assert key in metrics, key
    # Validation counted every pair once over both ranks.
    assert json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]["world_size"] == 2


# ---- the pipeline -----------------------------------------------------------------------------------


@pytest.mark.slow  # ~4 min: two tiny pipelines through Prefect and MLflow
def test_the_pipeline_tunes_registers_and_tunes_its_champion_further(prefect_harness, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from lm.tracking.runs import run_tree

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(300))
    common = [f"workdir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "finetune.task=dpo",
              f"finetune.data={data}", "finetune.max_steps=30", "deploy.promote_metric=eval/rewards/accuracy",
              "deploy.model_name=lmforge-tiny-dpo"]
    first = pipeline(config=load_config("tiny", common))
    tree = run_tree(first["tracking_uri"], first["mlflow_run_id"])
    assert tree["parent"].info.status == "FINISHED"
    evaluated = tree["children"]["evaluate"].data.metrics
    assert evaluated["eval/base_rewards/accuracy"] == 0.5 and evaluated["eval/rewards/accuracy"] >= 0.9
    assert {"eval/rewards/margins", "eval/logp_accuracy", "eval/bpb"} <= set(evaluated)
    assert tree["children"]["finetune_data"].data.metrics["finetune_data/skipped_duplicate"] == 0
    card = (Path(first["export"]) / "hf" / "README.md").read_text()
    assert "preference-tuned with lmforge (`finetune.task=dpo`)" in card and "DPO (loss=sigmoid, beta=0.1)" in card
    mlflow.set_tracking_uri(first["tracking_uri"])
    answer = mlflow.pyfunc.load_model("models:/lmforge-tiny-dpo@champion").predict(
        pd.DataFrame({"prompt": ["Give me the number 7."]}), params={"max_new_tokens": 8})
    assert answer["completion_tokens"][0] > 0

    # A team tunes its champion further: the registered chat model is the starting model and the reference.
    second = pipeline(config=load_config("tiny", [*common, "model.init_from=models:/lmforge-tiny-dpo@champion"]))
    tree = run_tree(second["tracking_uri"], second["mlflow_run_id"])
    assert tree["parent"].info.status == "FINISHED"
    base = json.loads((Path(second["base_model"]) / "source.json").read_text())
    assert base["task"] == "dpo"
    assert tree["children"]["evaluate"].data.metrics["eval/base_rewards/accuracy"] == 0.5
    client = MlflowClient(second["tracking_uri"])
    assert len(client.search_model_versions("name='lmforge-tiny-dpo'")) == 2
