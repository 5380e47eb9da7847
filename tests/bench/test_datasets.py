"""Loaders on small hand-written files, and the synthetic generator's statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pensieve.bench.datasets import (SHAREGPT_SPEC, ULTRACHAT_SPEC, Conversation, Turn, cap_context,
                                     conversation_stats, generate_synthetic, load_sharegpt, load_ultrachat)


def encode(text: str) -> list[int]:
    """A stand-in tokenizer: one id per whitespace-separated word."""
    return [len(w) for w in text.split()]


def test_sharegpt_loader(tmp_path):
    data = [
        {"id": "a", "conversations": [
            {"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello to you friend"},
            {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "fine"}]},
        {"id": "b", "conversations": [  # role/content spelling, a system prompt, a trailing user turn
            {"from": "system", "value": "be brief"}, {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y z"}, {"from": "user", "value": "unanswered"}]},
        {"id": "c", "conversations": [{"from": "human", "value": 3}]},            # value not a string
        {"id": "d", "conversations": "nope"},                                    # not a list
        {"id": "e", "conversations": [{"from": "human", "value": "only a question"}]},
        "garbage",
        {"id": "f", "conversations": [  # two user messages in a row: keep the turns before
            {"from": "gpt", "value": "greeting"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]},
        {"id": "g", "conversations": [{"from": "alien", "value": "?"}, {"from": "gpt", "value": "!"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    convs = load_sharegpt(path, encode)
    assert [c.conv_id for c in convs] == ["a", "b", "f"]
    a = convs[0]
    assert [t.user_text for t in a.turns] == ["hi there", "how are you"]
    assert [t.reply_len for t in a.turns] == [4, 1]
    assert a.turns[0].reply_text == "hello to you friend"
    assert a.turns[1].user_ids(encode) == [3, 3, 3]
    b = convs[1]
    assert b.system == "be brief" and len(b.turns) == 1 and b.turns[0].reply_len == 2
    f = convs[2]
    assert [t.user_text for t in f.turns] == ["q1"]


def test_ultrachat_loader(tmp_path):
    lines = [
        json.dumps({"id": "1", "data": ["question one", "answer number one", "q two", "a two two"]}),
        json.dumps({"id": "2", "data": ["lonely question"]}),                 # no reply: no turn
        "{not json",
        "",
        json.dumps({"id": "3", "data": ["q", 5]}),                            # malformed item
        json.dumps({"prompt_id": "4", "messages": [{"role": "user", "content": "u"},
                                                   {"role": "assistant", "content": "v w x"}]}),
        json.dumps({"id": "5", "data": ["q", "a", "dangling"]}),             # trailing user turn dropped
    ]
    path = tmp_path / "ultrachat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    convs = load_ultrachat(path, encode)
    assert [c.conv_id for c in convs] == ["1", "4", "5"]
    assert [t.reply_len for t in convs[0].turns] == [3, 3]
    assert [t.user_text for t in convs[0].turns] == ["question one", "q two"]
    assert convs[1].turns[0].reply_len == 3
    assert len(convs[2].turns) == 1
    assert len(load_ultrachat(path, encode, max_conversations=2)) == 2


def test_cap_context_drops_later_turns():
    turns = tuple(Turn(reply_len=40, user_token_ids=tuple(range(10))) for _ in range(5))   # 50 tokens a turn
    conv = Conversation("c", turns)
    assert len(cap_context(conv, 120).turns) == 2
    assert len(cap_context(conv, 250).turns) == 5
    assert cap_context(conv, 49) is None


@pytest.mark.parametrize("spec", [SHAREGPT_SPEC, ULTRACHAT_SPEC], ids=lambda s: s.name)
def test_synthetic_matches_table2(spec):
    vocab = list(range(5, 1000))
    convs = generate_synthetic(spec, 6000, vocab, seed=1)
    st = conversation_stats(convs)
    assert st["conversations"] == 6000
    assert st["turns_per_conversation"] == pytest.approx(spec.mean_turns, rel=0.04)
    assert st["input_tokens_per_turn"] == pytest.approx(spec.mean_input_tokens, rel=0.04)
    assert st["output_tokens_per_turn"] == pytest.approx(spec.mean_output_tokens, rel=0.04)
    ids = np.concatenate([np.asarray(t.user_token_ids) for c in convs[:200] for t in c.turns])
    assert ids.min() >= 5 and ids.max() < 1000          # only the allowed (non-special) ids
    assert all(t.reply_len >= 1 and len(t.user_token_ids) >= 1 for c in convs for t in c.turns)


def test_synthetic_is_reproducible_and_capped():
    vocab = list(range(100))
    a = generate_synthetic(SHAREGPT_SPEC, 50, vocab, seed=7)
    b = generate_synthetic(SHAREGPT_SPEC, 50, vocab, seed=7)
    c = generate_synthetic(SHAREGPT_SPEC, 50, vocab, seed=8)
    assert a == b
    assert a != c
    capped = generate_synthetic(SHAREGPT_SPEC, 200, vocab, seed=3, max_context=600)
    for conv in capped:
        assert sum(len(t.user_token_ids) + t.reply_len for t in conv.turns) <= 600
    clipped = generate_synthetic(SHAREGPT_SPEC, 50, vocab, seed=3, max_input_tokens=8, max_output_tokens=4)
    assert max(t.reply_len for c in clipped for t in c.turns) <= 4
    assert max(len(t.user_token_ids) for c in clipped for t in c.turns) <= 8
