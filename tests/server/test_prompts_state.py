"""Token-append turns, length checks, and the response/conversation stores, without a server."""
from __future__ import annotations

import copy

import pytest

from pensieve.server.conversations import ConversationRegistry, ResponseStore, StoredResponse
from pensieve.server.errors import APIError
from pensieve.server.prompts import append_turn_ids, chat_prompt_ids, render, resolve_max_tokens

# Like Qwen3's: earlier assistant turns lose their <think>...</think> part when the chat goes on.
REWRITING_TEMPLATE = (
    "{%- for m in messages %}{%- set c = m['content'] %}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in c %}{%- set c = c.split('</think>')[-1] %}"
    "{%- endif %}{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pensieve.model.tiny_llama import tiny_llama_path

    return AutoTokenizer.from_pretrained(str(tiny_llama_path()))


def _turn(tokenizer, messages, reply_text: str, eos: bool):
    """Simulates one generated turn: prompt ids + reply ids (ending in <|im_end|> when `eos`)."""
    prompt = chat_prompt_ids(tokenizer, messages)
    reply = tokenizer.encode(reply_text, add_special_tokens=False)
    if eos:
        reply += [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return prompt + reply, reply


@pytest.mark.parametrize("eos", [True, False])
def test_append_matches_full_render_for_chatml(tokenizer, eos: bool) -> None:
    history = [{"role": "user", "content": "Hi there, who are you?"}]
    ids, reply = _turn(tokenizer, history, "I am a helpful bot.", eos)
    history = history + [{"role": "assistant", "content": "I am a helpful bot."}]
    new = [{"role": "user", "content": "Nice to meet you."}]
    appended = append_turn_ids(tokenizer, history, ids, reply, new)
    assert appended[:len(ids)] == ids
    # With a turn-by-turn template the appended prompt is exactly what a full render gives.
    assert tokenizer.decode(appended, skip_special_tokens=False) == render(tokenizer, history + new, True)


def test_append_keeps_tokens_when_the_template_rewrites_history(tokenizer) -> None:
    tok = copy.copy(tokenizer)
    tok.chat_template = REWRITING_TEMPLATE
    history = [{"role": "user", "content": "Question one?"}]
    reply_text = "<think>let me see</think>Answer one."
    ids, reply = _turn(tok, history, reply_text, eos=True)
    history = history + [{"role": "assistant", "content": reply_text}]
    new = [{"role": "user", "content": "Question two?"}]
    full = chat_prompt_ids(tok, history + new)
    assert full[:len(ids)] != ids  # a resent history would miss the cache from the rewritten turn on
    appended = append_turn_ids(tok, history, ids, reply, new)
    assert appended[:len(ids)] == ids  # token-append keeps every earlier token
    assert tok.decode(appended[len(ids):], skip_special_tokens=False) == \
        "\n<|im_start|>user\nQuestion two?<|im_end|>\n<|im_start|>assistant\n"


def test_resolve_max_tokens() -> None:
    assert resolve_max_tokens(10, None, 100, "max_tokens") is None
    assert resolve_max_tokens(10, 90, 100, "max_tokens") == 90
    for prompt, max_tokens in [(10, 91), (100, None), (0, 5), (10, 0)]:
        with pytest.raises(APIError) as info:
            resolve_max_tokens(prompt, max_tokens, 100, "max_tokens")
        assert info.value.status == 400


def _stored(rid: str, owner: str | None) -> StoredResponse:
    return StoredResponse(rid, owner, "conv", 0, "m", [], [1, 2], 1, "x", "stop", {})


def test_response_store_owner_and_capacity() -> None:
    store = ResponseStore(capacity=2)
    store.put(_stored("a", "alice"))
    store.put(_stored("b", "bob"))
    assert store.get("a", "bob") is None and store.get("a", "alice") is not None  # "a" is now the most recent
    assert not store.delete("a", "bob")
    store.put(_stored("c", "alice"))  # evicts the least recently used, "b"
    assert store.get("b", "bob") is None and len(store) == 2
    assert store.delete("a", "alice") and store.get("a", "alice") is None


def test_conversation_registry_busy_and_ttl() -> None:
    now = [0.0]
    reg = ConversationRegistry(ttl=10, clock=lambda: now[0])
    conv = reg.acquire("alice", "c1")
    with pytest.raises(APIError) as info:
        reg.acquire("alice", "c1")
    assert info.value.status == 409
    other = reg.acquire("bob", "c1")  # same name, other owner: another conversation
    assert other.engine_id != conv.engine_id
    with pytest.raises(APIError):
        reg.remove("alice", "c1")  # busy
    reg.release(conv)
    reg.release(other)
    assert reg.acquire("alice", "c1").engine_id == conv.engine_id
    reg.release(conv)
    now[0] = 11.0
    assert set(reg.expire()) == {conv.engine_id, other.engine_id} and len(reg) == 0
