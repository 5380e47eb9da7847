"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Only what the server reads is modelled; unknown fields are ignored (OpenAI clients send extras such as
`user` or `metadata`). Sampling fields are shared by all three generation endpoints.

Every string read is `Text`: JSON may carry a lone UTF-16 surrogate ("\ud800"), which no tokenizer
or UTF-8 encoder takes, so it is refused here (400) rather than failing later (500). Every float
is finite: NaN and +-Infinity (which Python's JSON parser accepts) are refused too.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _utf8(text: str) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"the string holds a lone UTF-16 surrogate at index {exc.start}: "
                             "not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Role = Literal["system", "developer", "user", "assistant", "tool"]
TokenIds = list[Annotated[int, Field(ge=0)]]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Lenient):
    type: Literal["text", "input_text", "output_text"] = "text"
    text: Text


class ChatMessage(_Lenient):
    role: Role
    content: Union[Text, list[TextPart], None] = None
    name: Text | None = None

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

    model: Text
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: Union[Text, list[Text], None] = None
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
    # vLLM's field: KV is reused only between requests with the same salt (and the same API key);
    # for isolation finer than the key, e.g. per end user of one application
    cache_salt: Text | None = Field(default=None, min_length=1, max_length=256)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Pensieve extension: names the conversation that owns this request's KV (what a delete frees).
    conversation_id: Text | None = Field(default=None, min_length=1, max_length=256)


class CompletionRequest(SamplingFields):
    prompt: Union[Text, list[Text], TokenIds, list[TokenIds]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ResponseInputMessage(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponsesRequest(_Lenient):
    model: Text
    input: Union[Text, list[ResponseInputMessage]]
    instructions: Text | None = None
    previous_response_id: Text | None = None
    store: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    stream: bool = False
    cache_salt: Text | None = Field(default=None, min_length=1, max_length=256)   # as SamplingFields
    ignore_eos: bool = False                                                       # as SamplingFields
