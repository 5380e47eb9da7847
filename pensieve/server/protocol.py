"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Only what the server reads is modelled; unknown fields are ignored (OpenAI clients send extras such as
`user` or `metadata`). Sampling fields are shared by all three generation endpoints.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant", "tool"]
TokenIds = list[Annotated[int, Field(ge=0)]]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text", "input_text", "output_text"] = "text"
    text: str


class ChatMessage(_Lenient):
    role: Role
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    """Fields that map onto SamplingParams; ranges are checked again by SamplingParams.validate."""

    model: str
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: the generated token ids on each choice (and the prompt's), so a client can
    # append exactly those ids to its next turn instead of re-tokenizing the text
    return_token_ids: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Pensieve extension: names the conversation that owns this request's KV (see DESIGN.md §4 item 2).
    conversation_id: str | None = Field(default=None, min_length=1, max_length=256)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ResponseInputMessage(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponsesRequest(_Lenient):
    model: str
    input: Union[str, list[ResponseInputMessage]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    stream: bool = False
