"""The limits of a server, the request bodies of OpenAI's chat completions and completions APIs (the fields a small decoder
can honour; unknown fields are ignored, as OpenAI-compatible servers do, and fields that would
change the answer in a way we cannot, such as ``n`` > 1 or ``logprobs``, are refused), a classify
body, and OpenAI's error shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


@dataclass(frozen=True)
class Limits:
    """What one server accepts (``lmforge serve`` options)."""

    max_concurrent: int = 64  # requests in flight (generation and classify); one more is a 429
    max_prompt_tokens: int | None = None  # None: the model's context less one token
    max_new_tokens: int | None = None  # largest max_tokens; None: what the context leaves
    max_body_bytes: int = 1 << 20
    timeout_s: float = 300.0  # from arrival to the last token; past it a 408 (or an error event)
    api_key: str | None = None  # required as "Authorization: Bearer KEY" everywhere but /health


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _encodable(text: str) -> str:
    # JSON's "\ud800" is a lone surrogate: a str Python holds but no tokenizer can encode (a 500 before).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate (\\ud800-\\udfff): send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]

# The engine samples in float32: the settings are kept where it means what the client asked
# (logits / 1e-300 is inf, top_p = 1e-300 rounds to 0, a penalty of 1e300 is inf; these once stopped
# the engine for every request, lm.generation.sampling now guards them too), and a seed within the 64 bits of
# torch.Generator.manual_seed (beyond them it raised in the engine).
MIN_TEMPERATURE = 1e-6  # above 0 (greedy)
MIN_TOP_P = 1e-6
REPETITION_PENALTY = (0.01, 100.0)
SEED = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOP = 4  # as OpenAI


class _Body(BaseModel):
    # Strict: "stream": "yes" or "max_tokens": "8" is a client bug to report, not to guess at.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED[0], le=SEED[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # Not in OpenAI's API; vLLM takes them the same way (the openai client's extra_body).
    top_k: int = Field(0, ge=0, le=2**31 - 1)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    # Refused unless left at their "off" value (see refused()).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, t: float) -> float:
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"give 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return t

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP:
            raise ValueError(f"give at most {MAX_STOP} stop strings, not {len(strings)}")
        if any(not s for s in strings):
            raise ValueError("a stop string must not be empty")
        return stop

    def refused(self) -> tuple[str, str] | None:
        """(param, why) for a setting this server cannot honour, else None."""
        if self.n != 1:
            return "n", "only n=1 is supported: send one request per completion"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported: use repetition_penalty (CTRL's, 1 = off)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            return "logprobs", "logprobs are not supported"
        return None


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refused(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools are not supported"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only the text response format is supported"
        return super().refused()

    def conversation(self) -> list[dict[str, str]]:
        # OpenAI's newer models call the system role "developer"; a chat template knows "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Generation):
    prompt: Text | list[Text]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refused(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "give one prompt (a string): several prompts are several requests here"
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported"
        return super().refused()

    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ClassifyBody(_Body):
    model: str | None = None
    input: Text | list[Text]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
