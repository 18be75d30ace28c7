"""Request and response schemas of the native endpoints (validated by pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_COMPARED = 8
CHAT_EXAMPLE = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 32,
    "temperature": 0,
}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    """One generation: ``prompt`` (raw completion) or ``messages`` (chat template applied)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [CHAT_EXAMPLE]})

    model: str | list[str] | None = Field(
        None,
        description=(
            "base model, adapter alias, or adapter@version; absent: the base model "
            "(unlike the OpenAI routes, which require it). A list (up to 8, distinct) compares "
            "models: each answers the same input, batched together in the engine"
        ),
    )
    prompt: str | None = Field(None, description="raw prompt; exclusive with messages")
    messages: list[Message] | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1, le=8)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if isinstance(self.model, list):
            if not 1 <= len(self.model) <= MAX_COMPARED:
                raise ValueError(f"`model` lists 1 to {MAX_COMPARED} models")
            if len(set(self.model)) != len(self.model):
                raise ValueError("`model` lists each model once")
        return self

    @property
    def compared(self) -> list[str] | None:
        """The models to compare, when ``model`` is a list."""
        return self.model if isinstance(self.model, list) else None

    def for_model(self, model: str | None) -> GenerateRequest:
        return self.model_copy(update={"model": model})

    def openai_body(self) -> dict[str, Any]:
        """The equivalent OpenAI chat/completions body for vLLM's serving layer."""
        return self.model_dump(exclude_none=True)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    index: int
    text: str
    finish_reason: str | None


class GenerateResponse(BaseModel):
    text: str = Field(description="the first choice's text")
    model: str = Field(description="what served it (adapter@version for adapters)")
    finish_reason: str | None
    usage: Usage
    choices: list[Choice]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResult(BaseModel):
    error: ErrorBody


class CompareResult(BaseModel):
    requested_model: str = Field(description="the model as listed in the request")
    result: GenerateResponse | ErrorResult


class CompareResponse(BaseModel):
    object: Literal["compare"] = "compare"
    results: list[CompareResult] = Field(description="one per listed model, in request order")


class BatchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"requests": [CHAT_EXAMPLE]}]}
    )
    requests: list[dict[str, Any]] = Field(min_length=1, description="GenerateRequest objects")


class BatchResponse(BaseModel):
    results: list[GenerateResponse | ErrorResult]
