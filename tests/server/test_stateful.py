"""Multi-turn reuse: resent histories, the Responses API chain, named conversations, 409s, key isolation."""
from __future__ import annotations

import openai
import pytest

from pensieve.server.runtime import owner_of
from tests.server.conftest import KEY_A, KEY_B, ServerHandle

BLOCK = 16  # CacheConfig.block_size of the test server
LONG = "Tell me everything you know about the history of the printing press in Europe, please, in detail."


def test_resent_history_cached_tokens_grow(server: ServerHandle) -> None:
    client = server.client()
    messages = [{"role": "system", "content": "You are a helpful assistant that answers briefly."}]
    cached, prompts = [], []
    for turn in range(3):
        messages.append({"role": "user", "content": f"Turn {turn}. {LONG}"})
        resp = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
        prompts.append(resp.usage.prompt_tokens)
        messages.append({"role": "assistant", "content": resp.choices[0].message.content})
    assert cached[1] > 0 and cached[2] > cached[1], cached
    # Turn 3 resends turn 2's prompt text verbatim: at least its full blocks come from the cache.
    assert cached[2] >= (prompts[1] // BLOCK) * BLOCK - BLOCK
    assert all(c < p for c, p in zip(cached, prompts))  # the last prompt token is always computed


def test_responses_chain_appends_tokens(server: ServerHandle) -> None:
    client = server.client()
    r1 = client.responses.create(model="demo", input=LONG, instructions="Be brief.", max_output_tokens=8,
                                 temperature=0)
    assert r1.object == "response" and r1.output[0].type == "message"
    assert r1.output_text == r1.output[0].content[0].text
    r2 = client.responses.create(model="demo", input="And in Asia?", previous_response_id=r1.id,
                                 max_output_tokens=8, temperature=0)
    first_len = r1.usage.input_tokens + r1.usage.output_tokens
    assert r2.usage.input_tokens > first_len
    # Token-append turns keep every earlier token, so all full blocks of turn 1 (prompt + reply, whose last
    # sampled token has no KV yet) are reused.
    assert r2.usage.input_tokens_details.cached_tokens >= ((first_len - 1) // BLOCK) * BLOCK > 0
    state = server.app.state.pensieve
    owner = owner_of(KEY_A)
    stored1, stored2 = state.responses.get(r1.id, owner), state.responses.get(r2.id, owner)
    assert stored2.token_ids[:len(stored1.token_ids)] == stored1.token_ids
    assert stored2.conversation_id == stored1.conversation_id
    assert [m["role"] for m in stored2.messages] == ["system", "user", "assistant", "user", "assistant"]

    got = client.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == r1.output_text
    client.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="demo", input="x", previous_response_id=r2.id, max_output_tokens=2)


def test_responses_streaming(server: ServerHandle) -> None:
    client = server.client()
    events = list(client.responses.create(model="demo", input="Say something.", max_output_tokens=6,
                                          temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == deltas and final.usage.output_tokens <= 6
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # A streamed response is stored too and can be continued.
    follow = client.responses.create(model="demo", input="More.", previous_response_id=final.id,
                                     max_output_tokens=2)
    assert follow.usage.input_tokens_details.cached_tokens > 0


def test_store_false_is_not_retrievable(server: ServerHandle) -> None:
    client = server.client()
    r = client.responses.create(model="demo", input="hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_named_conversation_delete_and_isolation(server: ServerHandle) -> None:
    client = server.client()
    messages = [{"role": "user", "content": LONG}]
    client.chat.completions.create(model="demo", messages=messages, max_tokens=4,
                                   extra_body={"conversation_id": "named-1"})
    with server.http(KEY_B) as other:  # another key neither sees nor deletes it
        r = other.delete("/v1/conversations/named-1")
        assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found"
    with server.http(KEY_A) as http:
        r = http.delete("/v1/conversations/named-1")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert http.delete("/v1/conversations/named-1").status_code == 404


def test_concurrent_requests_on_one_conversation_conflict(server: ServerHandle) -> None:
    client = server.client()
    body = dict(model="demo", messages=[{"role": "user", "content": "Count to a hundred."}], max_tokens=200,
                extra_body={"conversation_id": "busy-conv", "ignore_eos": True})
    stream = client.chat.completions.create(stream=True, **body)
    next(iter(stream))  # the first request is now running
    with pytest.raises(openai.ConflictError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == 409 and info.value.body["code"] == "conversation_busy"
    # Another key's conversation of the same name is a different conversation.
    other = server.client(KEY_B).chat.completions.create(**{**body, "max_tokens": 2})
    assert other.usage.completion_tokens == 2
    stream.close()
    server.wait_idle()
    again = client.chat.completions.create(**{**body, "max_tokens": 2})  # released after the stream ended
    assert again.usage.completion_tokens == 2


def test_responses_isolated_between_keys(server: ServerHandle) -> None:
    mine = server.client(KEY_A).responses.create(model="demo", input="secret", max_output_tokens=2)
    theirs = server.client(KEY_B)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.create(model="demo", input="x", previous_response_id=mine.id, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(mine.id)
    assert server.client(KEY_A).responses.retrieve(mine.id).id == mine.id
    assert len(mine.id) > 20  # unguessable: resp_ + 128 random bits


def test_concurrent_turns_on_one_response_chain_conflict(server: ServerHandle) -> None:
    client = server.client()
    first = client.responses.create(model="demo", input="Start.", max_output_tokens=2)
    stream = client.responses.create(model="demo", input="Go on at length.", previous_response_id=first.id,
                                     max_output_tokens=200, stream=True)
    next(iter(stream))  # response.created: the chain's conversation is now busy
    with pytest.raises(openai.ConflictError):
        client.responses.create(model="demo", input="Me too.", previous_response_id=first.id, max_output_tokens=2)
    stream.close()
    server.wait_idle()
    assert client.responses.create(model="demo", input="Now.", previous_response_id=first.id,
                                   max_output_tokens=2).status in ("completed", "incomplete")
