"""The request bodies of the OpenAI API that ``llmops serve`` answers, checked strictly.

pydantic does the checking; what is written here is the list of fields (OpenAI's names and
ranges) and the one-line message a client gets when a body does not fit: a field of the
wrong type, a value out of range, a field OpenAI knows and this server does not support,
or a field nobody knows. Strict mode: ``"max_tokens": "8"`` is an error, as it is at OpenAI.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 5  # alternatives per position, as OpenAI's completions allow

# OpenAI request fields this server does not implement: named as such instead of "unknown".
UNSUPPORTED = frozenset({
    "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "response_format",
    "logit_bias", "echo", "suffix", "best_of", "parallel_tool_calls", "modalities", "audio", "prediction",
    "store", "metadata", "service_tier", "reasoning_effort", "web_search_options",
})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, str]:
        # Chat templates know system/user/assistant; OpenAI's "developer" is the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


class ChatRequest(_Sampling):
    unsupported: ClassVar[frozenset[str]] = UNSUPPORTED
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """A prompt as text, texts, token ids or lists of token ids (lm-eval sends the last), with
    ``echo`` and ``logprobs``; ``max_tokens`` may be 0 (score the prompt, generate nothing)."""

    unsupported: ClassVar[frozenset[str]] = UNSUPPORTED - {"logprobs", "echo"}
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class BadRequest(Exception):
    """A request that does not fit: HTTP status, OpenAI error code, offending parameter."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.headers = headers or {}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[TextPart]", "TextPart", "list[int]", "list[list[int]]"):
            continue  # the branch of a union pydantic tried, not a field
        else:
            out += ("." if out else "") + str(part)
    return out


def parse(kind: type[_Sampling], body: Any) -> _Sampling:
    """The request, or :class:`BadRequest` naming the first field that does not fit."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key in body:
        if key in getattr(kind, "unsupported", UNSUPPORTED):
            raise BadRequest(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    try:
        req = kind.model_validate(body)
    except ValidationError as exc:
        errs = exc.errors()
        # a union reports one error per branch: the first names the field well enough
        e = errs[0]
        where = _loc(tuple(e.get("loc", ())))
        if e.get("type") == "extra_forbidden":
            raise BadRequest(f"unknown field '{where}'", param=where, code="unknown_parameter") from None
        if e.get("type") == "missing":
            raise BadRequest(f"'{where}' is required", param=where) from None
        if where.startswith("prompt") and kind is CompletionRequest:
            raise BadRequest("'prompt': give a string, a list of strings, a list of token ids or a list of lists "
                             "of token ids", param="prompt") from None
        raise BadRequest(f"'{where}': {e.get('msg', 'invalid value')}", param=where) from None
    if isinstance(req, CompletionRequest):
        prompts = req.prompts()
        if not prompts or any(len(p) == 0 for p in prompts if isinstance(p, list)):
            raise BadRequest("'prompt' is empty", param="prompt")
        if req.stream and (len(prompts) > 1 or req.logprobs is not None or req.echo):
            raise BadRequest("'stream': a streamed completion takes one prompt, without 'logprobs' or 'echo'",
                             param="stream")
    if req.stop is not None and isinstance(req.stop, list) and len(req.stop) > 4:
        raise BadRequest("'stop': at most 4 sequences", param="stop")
    return req
