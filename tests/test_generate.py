"""Generation: the KV cache changes no token, batches equal single prompts, sampling knobs do what
they say, stop strings and end-of-text end a row, Hugging Face's Llama generates the same, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lm.generation.kv_cache import KVCache
from lm.generation.sampling import (
    GenerationBatch,
    SamplingParams,
    decode_step,
    generate,
    generate_text,
    prefill,
    sample_next,
)
from lm.models.folder import save_model
from lm.models.hf import hf_config_and_state
from lm.models.transformer import Decoder, Encoder, ModelArgs, _plain_layers, llama_config_dict
from lm.text.tokenizer import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_new_tokens=20, temperature=0)
EOT = 256  # the byte tokenizer's first special token


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(["<|endoftext|>", "<|pad|>"])


def tiny(**kw) -> ModelArgs:
    base = dict(vocab_size=258, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


@pytest.fixture(scope="module")
def model() -> Decoder:
    """A random decoder whose greedy text is varied ASCII: wide weights (a GPT-2 init repeats one token)
    and zero logits for bytes >= 128, so decoded text is the same whether read whole or token by token."""
    torch.manual_seed(0)
    m = Decoder(tiny(tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        m.lm_head.weight[128:] = 0.0
    return m


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    return [tok.encode(s).ids for s in ["def f(x):", "hello", "The quick brown fox jumps", "a"]]


def test_greedy_with_cache_equals_greedy_without_token_for_token(model, prompts):
    cached = generate(model, prompts, GREEDY)
    full = generate(model, prompts, GREEDY, use_cache=False)
    assert [g.ids for g in cached] == [g.ids for g in full]
    assert all(len(g.ids) == 20 for g in cached)


def test_a_batch_of_different_lengths_equals_one_prompt_at_a_time(model, prompts):
    batched = generate(model, prompts, GREEDY)
    alone = [generate(model, [p], GREEDY)[0] for p in prompts]
    assert [g.ids for g in batched] == [g.ids for g in alone]
    assert len({tuple(g.ids) for g in batched}) == len(prompts)  # the rows did not copy each other


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_logits_equal_full_forward_logits(n_kv_head):
    torch.manual_seed(1)
    m = Decoder(tiny(n_kv_head=n_kv_head)).eval()
    lengths = [7, 12, 3]
    seqs = torch.randint(0, 258, (3, 30))
    with torch.no_grad():
        full = m(seqs)[0]  # (B, T, V)
        cache, logits = prefill(m, [seqs[b, :n].tolist() for b, n in enumerate(lengths)], max_len=40)
        for step in range(15):  # every row at its own position
            want = torch.stack([full[b, n + step - 1] for b, n in enumerate(lengths)])
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
            logits = decode_step(m, cache, torch.stack([seqs[b, n + step] for b, n in enumerate(lengths)]))
        # Rows leave and join: the two left continue exactly where they were.
        kept = cache.select([2, 0])
        nxt = decode_step(m, kept, torch.stack([seqs[2, lengths[2] + 15], seqs[0, lengths[0] + 15]]))
        torch.testing.assert_close(nxt, torch.stack([full[2, 18], full[0, 22]]), atol=1e-5, rtol=0)
        # A chunk of several tokens at once, at an offset, every row at the same position.
        one = KVCache.empty(m.args, 1, 40)
        m(seqs[:1, :10], cache=one)
        chunk = m(seqs[:1, 10:25], cache=one)[0]
        torch.testing.assert_close(chunk, full[:1, 10:25], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_decode_path_equals_the_modules_and_follows_weight_updates(dtype):
    """Decoding without autograd reads the weights directly (lm.models.transformer._decode_layers): the same logits
    as the layers' modules, to the last bit; an in-place weight update (an optimizer step) is seen."""
    torch.manual_seed(3)
    m = Decoder(tiny(n_kv_head=2)).eval().to(dtype)
    prompts = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5]]

    def run(lean: bool) -> list[torch.Tensor]:
        m.__dict__["_lean_decode"] = lean
        cache, logits = prefill(m, prompts, max_len=32)
        out, tokens = [logits], logits.argmax(-1)
        for _ in range(6):
            out.append(decode_step(m, cache, tokens))
            tokens = out[-1].argmax(-1)
        return out

    modules, lean = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(modules, lean, strict=True))
    with torch.no_grad():
        m.layers[0].self_attn.k_proj.weight.mul_(0.5)
        m.layers[1].mlp.up_proj.weight.add_(0.01)
    modules, lean = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(modules, lean, strict=True))
    del m.__dict__["_lean_decode"]
    assert _plain_layers(m)
    m.layers[0].mlp.register_forward_hook(lambda *_: None)  # a hooked (or peft-wrapped) layer: modules only
    assert not _plain_layers(m)


def test_the_training_forward_ignores_the_cache_code_and_the_encoder_refuses_a_cache():
    torch.manual_seed(2)
    enc = Encoder(tiny(kind="encoder")).eval()
    x = torch.randint(0, 258, (2, 9))
    assert enc(x)[0].shape == (2, 9, 258)
    with pytest.raises(ValueError, match="decoder"):
        enc(x, cache=KVCache.empty(enc.args, 2))


def test_top_k_1_and_a_tiny_top_p_equal_greedy(model, prompts):
    greedy = [g.ids for g in generate(model, prompts, GREEDY)]
    for knob in (dict(top_k=1), dict(top_p=1e-6)):
        params = SamplingParams(max_new_tokens=20, temperature=1.5, seed=3, **knob)
        assert [g.ids for g in generate(model, prompts, params)] == greedy


def test_same_seed_gives_the_same_sample_and_another_seed_another(model, prompts):
    def run(seed):
        params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=seed)
        return [g.ids for g in generate(model, prompts, params)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7) != [g.ids for g in generate(model, prompts, GREEDY)]


def test_repetition_penalty_moves_the_argmax_off_a_token_already_read():
    logits = torch.tensor([[3.0, 2.5, -1.0, 0.0]])
    seen = torch.tensor([[True, False, False, False]])
    plain = SamplingParams(temperature=0)
    assert sample_next(logits, [plain], seen=seen).item() == 0
    penalised = SamplingParams(temperature=0, repetition_penalty=1.3)  # 3.0 / 1.3 < 2.5
    assert sample_next(logits, [penalised], seen=seen).item() == 1
    # A negative logit is multiplied: the penalty never makes a seen token more likely.
    neg = torch.tensor([[-1.0, -1.2]])
    assert sample_next(neg, [penalised], seen=torch.tensor([[True, False]])).item() == 1


def test_repetition_penalty_stops_a_model_repeating_itself(model, tok):
    prompt = [tok.encode("abababababab").ids]
    plain = generate(model, prompt, SamplingParams(max_new_tokens=30, temperature=0))[0]
    params = SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=5.0)
    penalised = generate(model, prompt, params)[0]
    assert len(set(penalised.ids)) > len(set(plain.ids))


def test_top_k_keeps_sampling_among_the_k_likeliest():
    logits = torch.tensor([[5.0, 4.0, 3.0, -2.0, -3.0]]).repeat(200, 1)
    draws = sample_next(logits, [SamplingParams(top_k=2)] * 200, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    draws = sample_next(logits, [SamplingParams(top_p=0.9)] * 200, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}  # p = 0.66, 0.24, 0.09: 0.66 + 0.24 reaches 0.9


def test_a_stop_string_ends_the_text_and_is_left_out(model, prompts, tok):
    free = generate(model, prompts[:1], GREEDY, tokenizer=tok)[0]
    stop = free.text[8:10]  # two characters from the middle of what the model writes anyway
    cut = free.text.index(stop)
    params = SamplingParams(max_new_tokens=20, temperature=0, stop=[stop])
    got = generate(model, prompts[:1], params, tokenizer=tok)[0]
    assert got.finish_reason == "stop" and got.text == free.text[:cut]
    assert got.ids == free.ids[:cut]  # one byte per token: the tokens before the stop string
    assert got.completion_tokens == cut + len(stop)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompts[:1], SamplingParams(stop=["x"]))


def test_end_of_text_stops_its_row_while_the_others_continue(model, prompts):
    free = [g.ids for g in generate(model, prompts, GREEDY)]
    eos = next(t for t in free[0][3:] if t not in free[1])  # ends row 0 early, never row 1
    out = generate(model, prompts, GREEDY, eos_ids=[eos])
    cut = free[0].index(eos)
    assert out[0].ids == free[0][:cut] and out[0].finish_reason == "stop"
    assert out[0].completion_tokens == cut + 1  # the end-of-text token was produced, not returned
    assert out[1].ids == free[1] and out[1].finish_reason == "length"
    for o, f in zip(out[2:], free[2:], strict=True):
        assert o.ids == (f[: f.index(eos)] if eos in f else f)


def test_max_new_tokens_counts_and_prompt_tokens_report_what_was_read(model, prompts):
    out = generate(model, prompts, SamplingParams(max_new_tokens=5, temperature=0.7, seed=0))
    assert [len(g.ids) for g in out] == [5] * len(prompts)
    assert all(g.finish_reason == "length" and g.completion_tokens == 5 for g in out)
    assert [g.prompt_tokens for g in out] == [len(p) for p in prompts]


def test_a_prompt_too_long_keeps_its_last_tokens(model):
    long = torch.randint(0, 128, (100,)).tolist()  # seq_len is 64
    [got] = generate(model, [long], GREEDY)
    assert got.prompt_tokens == 64 - 20
    assert got.ids == generate(model, [long[-44:]], GREEDY)[0].ids
    with pytest.raises(ValueError, match="no room"):
        generate(model, [long], SamplingParams(max_new_tokens=64, temperature=0))


def test_rows_join_and_leave_a_running_batch(model, prompts):
    alone = [generate(model, [p], GREEDY)[0].ids for p in prompts]
    batch = GenerationBatch(model)
    first = batch.add(prompts[:2], GREEDY)
    done = {}
    for _ in range(7):
        done.update(batch.step())
    later = batch.add(prompts[2:], SamplingParams(max_new_tokens=20, temperature=0))
    cancelled = batch.cancel([first[1]])
    while batch:
        done.update(batch.step())
    assert done[first[0]].ids == alone[0]
    assert cancelled[first[1]].ids == alone[1][:7]
    assert [done[h].ids for h in later] == alone[2:]


def test_generate_text_decodes(model, tok):
    [g] = generate_text(model, tok, ["hello"], SamplingParams(max_new_tokens=6, temperature=0))
    assert g.text == tok.decode(g.ids) and len(g.ids) == 6


def test_sampling_params_name_the_bad_field():
    for bad, field in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(repetition_penalty=0), "repetition_penalty"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_greedy_equals_transformers_llama_generate(prompts):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    ours = Decoder(tiny()).eval()  # GQA, tied embeddings
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(ours.args))).eval()
    hf.load_state_dict(hf_config_and_state(ours)[1], strict=False)
    hf.generation_config.eos_token_id = None  # LlamaConfig's default end-of-text id is 2
    hf.generation_config.pad_token_id = 0
    mine = generate(ours, prompts, SamplingParams(max_new_tokens=25, temperature=0))
    for p, g in zip(prompts, mine, strict=True):
        out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=25, min_new_tokens=25)
        assert out[0, len(p) :].tolist() == g.ids


# ---- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, model, tok):
    """A pretraining output: model.json (with its eot id) + tokenizer.json beside it."""
    save_model(model, tmp_path / "lm", extra={"eot_id": EOT})
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "lm"


def test_cli_generate_prints_the_completion(model_dir, model, tok, capsys):
    from flows.cli import main

    args = ["generate", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "12", "hello"]
    assert main(args) == 0
    [want] = generate_text(model, tok, ["hello"], SamplingParams(max_new_tokens=12, temperature=0), [EOT])
    assert capsys.readouterr().out == want.text + "\n"


def test_cli_generate_applies_the_chat_template(model_dir, model, tok, capsys):
    from flows.cli import main

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    (model_dir.parent / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    args = ["generate", "-m", str(model_dir), "--temperature", "0", "--max-new-tokens", "8", "--chat", "hi"]
    assert main(args) == 0
    [want] = generate_text(
        model, tok, ["<user>hi<a>"], SamplingParams(max_new_tokens=8, temperature=0), [EOT]
    )
    assert capsys.readouterr().out == want.text + "\n"


def test_cli_generate_reads_a_hugging_face_folder_with_its_chat_template_and_eos(tmp_path, model, capsys):
    from flows.cli import main
    from lm.models.hf import export_hf

    tok = byte_tokenizer(["<|endoftext|>", "<|pad|>"])
    free = generate_text(model, tok, ["<user>hi<a>"], SamplingParams(max_new_tokens=12, temperature=0))[0]
    eos = tok.decode([free.ids[5]])  # a byte the model writes: named the eos token, it ends the reply there
    tok.add_special_tokens([eos])  # the same id, now special
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<a>"
    export_hf(
        model,
        tmp_path / "tokenizer.json",
        tmp_path / "hf",
        chat_template=template,
        special_tokens={"eos_token": eos, "bos_token": None, "pad_token": None},
    )
    args = [
        "generate",
        "-m",
        str(tmp_path / "hf"),
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--chat",
        "hi",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out == tok.decode(free.ids[: free.ids.index(free.ids[5])]) + "\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("not_a_model", "not a model folder"),
        ("bad_temperature", "temperature"),
        ("too_many_tokens", "no room"),
        ("no_template", "chat template"),
    ],
)
def test_cli_generate_errors_are_one_line(model_dir, tmp_path, capsys, case, message):
    from flows.cli import main

    model = {"missing": str(tmp_path / "nope"), "not_a_model": str(tmp_path)}.get(case, str(model_dir))
    extra = {
        "bad_temperature": ["--temperature", "-1"],
        "too_many_tokens": ["--max-new-tokens", "64"],
        "no_template": ["--chat"],
    }.get(case, [])
    assert main(["generate", "--model", model, *extra, "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and message in err and len(err.strip().splitlines()) == 1
