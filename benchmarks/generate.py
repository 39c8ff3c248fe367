"""Generation speed, one stream: lmforge with its KV cache, lmforge reading the whole sequence again
every token (no cache), and Hugging Face's LlamaForCausalLM.generate (greedy, use_cache=True) on the
same weights (lm.models.hf.hf_config_and_state), the same prompt and the same number of new tokens.

    python benchmarks/generate.py                       # the demo's shape (conf/default.yaml), random weights
    python benchmarks/generate.py --model runs/.../pretrain --new-tokens 200

Every contender runs once untimed (warm-up), then the contenders alternate for ``--rounds`` rounds and
each keeps its best round: on a shared machine a neighbour's burst only ever slows a round down.
Tokens/s = new tokens / time of the whole call (prompt read included), by two clocks: the wall
clock (``NAME_tokens_s``) and the process's CPU time over all its threads (``NAME_tokens_cpu_s``,
tokens per core-second: steadier when other processes share the cores). Ends with one line of
key=value figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm.config import load_config  # noqa: E402
from lm.generation.sampling import SamplingParams, generate  # noqa: E402
from lm.models.folder import build_model, load_model
from lm.models.hf import hf_config_and_state
from lm.models.transformer import Decoder, count_params, llama_config_dict, model_args

ROOT = Path(__file__).resolve().parent.parent


def demo_model(vocab_size: int) -> Decoder:
    """The demo's network (conf/default.yaml's model section), random weights."""
    cfg = load_config(str(ROOT / "conf" / "default.yaml"), [])
    torch.manual_seed(0)
    return build_model(model_args(cfg.model, vocab_size)).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a decoder folder (model.json); default: the demo's shape, random weights")
    p.add_argument("--vocab-size", type=int, default=4096, help="without --model (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--only", default="cache,nocache,transformers", help="comma-separated contenders")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    model = load_model(a.model) if a.model else demo_model(a.vocab_size)
    args = model.args
    prompt = torch.randint(0, args.vocab_size, (a.prompt_tokens,), generator=torch.Generator().manual_seed(1))
    ids = prompt.tolist()
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0)
    warm = SamplingParams(max_new_tokens=min(16, a.new_tokens), temperature=0)

    contenders = {
        "cache": lambda p: generate(model, [ids], p)[0].ids,
        "nocache": lambda p: generate(model, [ids], p, use_cache=False)[0].ids,
    }
    only = a.only.split(",")
    if "transformers" in only:
        try:
            import transformers
        except ImportError:
            sys.exit("transformers is not installed: pip install 'lmforge[bench]'")
        transformers.logging.set_verbosity_error()
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(args))).eval()
        hf.load_state_dict(hf_config_and_state(model)[1], strict=False)
        hf.generation_config.eos_token_id = None  # run every token, as lmforge does without eos_ids
        hf.generation_config.pad_token_id = 0
        x, mask = prompt[None], torch.ones(1, a.prompt_tokens, dtype=torch.long)

        def run_hf(p: SamplingParams) -> list[int]:
            with torch.inference_mode():
                out = hf.generate(
                    x,
                    attention_mask=mask,
                    do_sample=False,
                    use_cache=True,
                    max_new_tokens=p.max_new_tokens,
                    min_new_tokens=p.max_new_tokens,
                )
            return out[0, a.prompt_tokens :].tolist()

        contenders["transformers"] = run_hf
    contenders = {k: v for k, v in contenders.items() if k in only}

    outputs = {name: run(warm) for name, run in contenders.items()}
    best = {clock: dict.fromkeys(contenders, 0.0) for clock in ("wall", "cpu")}
    for r in range(a.rounds):
        for name, run in contenders.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = run(params)
            wall = len(outputs[name]) / (time.perf_counter() - t0)
            cpu = len(outputs[name]) / (time.process_time() - c0)
            best["wall"][name] = max(best["wall"][name], wall)
            best["cpu"][name] = max(best["cpu"][name], cpu)
            print(f"round {r}: {name:<12} {wall:8.1f} tokens/s {cpu:8.1f} tokens/cpu-s", flush=True)

    fig = {
        "params": count_params(model),
        "threads": torch.get_num_threads(),
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
    }
    for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
        b = best[clock]
        fig.update({f"{name}_tokens{suffix}_s": round(v, 1) for name, v in b.items()})
        if "cache" in b and "nocache" in b:
            fig[f"cache_speedup{suffix}"] = round(b["cache"] / b["nocache"], 3)
        if "cache" in b and "transformers" in b:
            fig[f"ratio_vs_transformers{suffix}"] = round(b["cache"] / b["transformers"], 3)
    ref = outputs.get("cache")
    fig["same_tokens"] = all(out == ref for out in outputs.values())  # greedy: every contender agrees
    print(" ".join(f"{k}={v}" for k, v in fig.items()))


if __name__ == "__main__":
    main()
