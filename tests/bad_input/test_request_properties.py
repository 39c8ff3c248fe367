"""Property tests (hypothesis) of the server's request bodies (lm/serving/protocol.py): any JSON
value either validates into a request or raises pydantic's ValidationError (which the app answers
as a 400), never another exception; and whatever validates can be sampled by the engine without an
error, the failure that used to stop the engine for every client."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lm.generation.sampling import SamplingParams, sample_next
from lm.serving.protocol import ChatCompletionRequest, ClassifyBody, CompletionRequest

# What json.loads gives (it reads NaN and Infinity too, so a client can send them).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
numbers = st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from([0, 1, 2, 1e-300, 1e300, -0.0, 2**63, 2**64])
texts = st.text(max_size=12) | st.sampled_from(["\ud800", "\x00", "", "日本語 🙂"])
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"])},
    optional={"content": texts | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                                       max_size=2) | json_values},
)
SAMPLING = ["temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens", "n", "presence_penalty"]
sampling_fields = st.dictionaries(st.sampled_from(SAMPLING), numbers | json_values, max_size=5)
stops = st.dictionaries(st.just("stop"), texts | st.lists(texts, max_size=6) | json_values, max_size=1)
chat_bodies = st.builds(
    lambda messages, fields, stop: {"messages": messages, **fields, **stop},
    st.lists(message, max_size=3) | json_values, sampling_fields, stops,
)
completion_bodies = st.builds(
    lambda prompt, fields, stop: {"prompt": prompt, **fields, **stop},
    texts | st.lists(texts, max_size=2) | json_values, sampling_fields, stops,
)


def validated(model, body):
    """The request, or None where pydantic refused it (the app's 400)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        assert e.errors() and all(err["msg"] for err in e.errors())
        return None


def sample_with(request) -> None:
    """What the app and the engine do with an accepted request's settings, on logits like a real
    model's (the special tokens' rows are 0, others large)."""
    params = SamplingParams(
        max_new_tokens=4, temperature=request.temperature, top_k=request.top_k or None, top_p=request.top_p,
        repetition_penalty=request.repetition_penalty,
        stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []), seed=request.seed,
    )
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    logits = torch.tensor([[0.0, 0.0, 30.0, -30.0, 1e-3, 5.0, -1e4, 80.0]])
    seen = torch.tensor([[True, False, True, True, False, True, True, False]])
    token = sample_next(logits, [params], generator, seen)
    assert token.shape == (1,) and 0 <= int(token[0]) < logits.size(-1)


@settings(max_examples=400, deadline=None)
@given(json_values | chat_bodies)
def test_any_json_gives_a_chat_request_or_a_validation_error(body):
    request = validated(ChatCompletionRequest, body)
    if request is None:
        return
    assert request.messages and all(m["role"] in ("system", "user", "assistant") for m in request.conversation())
    for m in request.conversation():
        m["content"].encode("utf-8")  # the tokenizer can read every text
    refused = request.refused()
    assert refused is None or (isinstance(refused[0], str) and refused[1])
    sample_with(request)


@settings(max_examples=300, deadline=None)
@given(json_values | completion_bodies)
def test_any_json_gives_a_completion_request_or_a_validation_error(body):
    request = validated(CompletionRequest, body)
    if request is None:
        return
    if request.refused() is None:
        assert isinstance(request.text(), str)
        request.text().encode("utf-8")
    sample_with(request)
    assert 0 <= request.temperature <= 2 and not math.isnan(request.top_p)


@settings(max_examples=150, deadline=None)
@given(json_values | st.builds(lambda x: {"input": x}, texts | st.lists(texts, max_size=3) | json_values))
def test_any_json_gives_a_classify_body_or_a_validation_error(body):
    request = validated(ClassifyBody, body)
    if request is not None:
        assert all(isinstance(t, str) and t.encode("utf-8") is not None for t in request.texts())
