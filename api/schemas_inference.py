"""OpenAI-compatible request and response shapes (the subset tuneloop serves)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas import MAX_TEXT, Message, RequestModel

MAX_TOKENS = 2048
SAMPLING_EPS = 1e-5
# Parameters clients send that tuneloop cannot honour: refused, rather than silently ignored.
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "best_of",
    "echo",
    "suffix",
)


class _Sampling(RequestModel):
    # Unknown harmless fields (presence_penalty=0, ...) are accepted and ignored, as
    # OpenAI clients send them; the unsupported ones are refused in ``refuse_unsupported``.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128, description="'default', 'base' or a version")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=8)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    # int64, as OpenAI documents it; torch refuses seeds it cannot unpack.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    user: str | None = Field(
        default=None,
        max_length=256,
        description="your end user's id: keeps them on one side of a canary across requests",
    )

    @field_validator("temperature")
    @classmethod
    def _greedy_below_epsilon(cls, value: float) -> float:
        # Dividing logits by a temperature of, say, 1e-300 overflows to inf and sampling fails
        # on NaN probabilities; such a temperature means greedy, as vLLM treats it (< 1e-5).
        return 0.0 if value < SAMPLING_EPS else value

    def refuse_unsupported(self) -> str | None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, [], {}):
                return name
        return None

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=200)

    @field_validator("messages")
    @classmethod
    def _ends_with_a_turn_to_answer(cls, value: list[Message]) -> list[Message]:
        if value[-1].role == "assistant":
            raise ValueError(
                "the last message must not be the assistant's: there is nothing to answer"
            )
        return value


class CompletionRequest(_Sampling):
    # Not empty: an empty prompt is zero tokens, which no model can continue (vLLM refuses it too).
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


ANSWERED_BY = (
    "the version that answered, whichever model was asked for: a version id, 'base' or "
    "'base (fallback)'"
)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str
    interaction_id: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description=ANSWERED_BY)
    choices: list[ChatChoice]
    usage: Usage
    interaction_id: str = Field(description="rate this answer with POST /v1/feedback")
    served_by: str = Field(description="the adapter version that answered, or 'base'")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    interaction_id: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description=ANSWERED_BY)
    choices: list[CompletionChoice]
    usage: Usage
    interaction_id: str
    served_by: str


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    status: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


def usage_of(prompt_tokens: int, completion_tokens: list[int]) -> Usage:
    prompt = prompt_tokens * len(completion_tokens)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=sum(completion_tokens),
        total_tokens=prompt + sum(completion_tokens),
    )


def sse(data: dict[str, Any] | str) -> bytes:
    import json

    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
