"""Chat and completions, streaming and not, driven by the real openai client."""
from __future__ import annotations

import httpx

from tests.server.conftest import MAX_MODEL_LEN, ServerHandle

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def test_health_and_models(server: ServerHandle) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}  # open without a key
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_version_as_vllm_answers_it(server: ServerHandle) -> None:
    from pensieve import __version__

    resp = httpx.get(f"{server.base_url}/version")  # open, like vLLM's
    assert resp.status_code == 200 and resp.json() == {"version": __version__}


def test_chat_non_streaming_usage(server: ServerHandle) -> None:
    resp = server.client().chat.completions.create(model="demo", messages=HELLO, max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 8
    prompt_ids = server.engine.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert resp.usage.prompt_tokens == len(server.engine.tokenizer.encode(prompt_ids, add_special_tokens=False))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    ext = resp.usage.model_extra["pensieve"]
    assert set(ext) == {"gpu_hit_tokens", "cpu_hit_tokens", "recomputed_tokens"}
    assert resp.usage.prompt_tokens_details.cached_tokens == ext["gpu_hit_tokens"] + ext["cpu_hit_tokens"]


def test_chat_streaming_matches_non_streaming(server: ServerHandle) -> None:
    client = server.client()
    kwargs = dict(model="demo", messages=HELLO, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content  # greedy: same tokens either way
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # same prompt as `full`


def test_stream_without_usage_has_no_usage_chunk(server: ServerHandle) -> None:
    chunks = list(server.client().chat.completions.create(model="demo", messages=HELLO, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_chat_logprobs(server: ServerHandle) -> None:
    resp = server.client().chat.completions.create(model="demo", messages=HELLO, max_tokens=4, temperature=0,
                                                   logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # greedy: the sampled token is the most likely one
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-4


def test_completions_string_and_token_ids(server: ServerHandle) -> None:
    client = server.client()
    text = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text.object == "text_completion" and text.usage.completion_tokens == 6
    ids = server.engine.tokenizer.encode("Once upon a time", add_special_tokens=True)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens_details.cached_tokens > 0 or len(ids) < 16
    nested = client.completions.create(model="demo", prompt=[ids], max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert nested.choices[0].text == text.choices[0].text


def test_completions_streaming_and_echo(server: ServerHandle) -> None:
    client = server.client()
    kwargs = dict(model="demo", prompt="The cat", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == full
    echoed = client.completions.create(echo=True, **kwargs).choices[0].text
    assert echoed == "The cat" + full


def test_completions_logprobs_and_stop(server: ServerHandle) -> None:
    client = server.client()
    resp = client.completions.create(model="demo", prompt="abc", max_tokens=5, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == 5 == len(lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text
    # Stopping on a piece of the greedy continuation cuts the text right before it.
    text = resp.choices[0].text
    stop = text[2:4] if len(text) >= 4 else None
    if stop and stop.strip():
        cut = client.completions.create(model="demo", prompt="abc", max_tokens=5, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == text[:text.index(stop)]


def test_seeded_sampling_is_reproducible(server: ServerHandle) -> None:
    client = server.client()
    kwargs = dict(model="demo", messages=HELLO, max_tokens=8, temperature=1.0, top_p=0.9, seed=1234,
                  extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_return_token_ids_gives_exact_ids_streamed_or_not(server: ServerHandle) -> None:
    """vLLM's `return_token_ids`: a client appends exactly these ids to its next turn (no re-tokenizing)."""
    client = server.client()
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    kwargs = dict(model="demo", prompt=prompt, max_tokens=10, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    full = client.completions.create(**kwargs).choices[0]
    assert full.model_extra["prompt_token_ids"] == prompt and len(full.model_extra["token_ids"]) == 10
    streamed = [i for c in client.completions.create(stream=True, **kwargs) for ch in c.choices
                for i in (ch.model_extra.get("token_ids") or [])]
    assert streamed == full.model_extra["token_ids"]
    plain = client.completions.create(model="demo", prompt=prompt, max_tokens=2).choices[0]
    assert "token_ids" not in (plain.model_extra or {})


def test_streamed_logprobs_add_up_to_the_whole(server: ServerHandle) -> None:
    """Each streamed chunk carries only its new tokens' logprobs (and offsets into the whole text)."""
    client = server.client()
    chat = dict(model="demo", messages=HELLO, max_tokens=9, temperature=0, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **chat) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole] and len(whole) == 9
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, whole))

    comp = dict(model="demo", prompt="The weather", max_tokens=7, temperature=0, logprobs=1,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**comp).choices[0]
    tokens, offsets = [], []
    for c in client.completions.create(stream=True, **comp):
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            offsets += c.choices[0].logprobs.text_offset
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert "".join(tokens) == full.text
