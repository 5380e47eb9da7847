"""KV events: the ledger's diffs (stored with parents in order, tier moves, removals, dropped leading blocks),
a real replica's events on a ZMQ socket, and vllm-router's kv_aware policy routing by them."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import zmq

from pensieve.cache.block_keys import block_keys, salt_root
from pensieve.server.kv_events import CPU, GPU, BlockLedger, block_hash
from pensieve.server.runtime import cache_salt_for
from tests.replicas.conftest import BLOCK, replicas, router

TOKENS = list(range(100, 100 + 4 * BLOCK + 5))   # 4 full blocks and a partial one


def test_ledger_announces_known_cached_blocks_in_chain_order() -> None:
    ledger = BlockLedger(BLOCK)
    keys = block_keys(TOKENS, BLOCK)
    assert ledger.diff(keys, []) == []           # cached, but no finished request has explained them yet
    ledger.learn(TOKENS)
    events = ledger.diff(reversed(keys), [])
    assert [e["type"] for e in events] == ["BlockStored"] * 4
    assert [e["block_hashes"] for e in events] == [[block_hash(k)] for k in keys]
    assert [e["parent_block_hash"] for e in events] == [None] + [block_hash(k) for k in keys[:-1]]
    assert events[1]["token_ids"] == TOKENS[BLOCK:2 * BLOCK] and {e["medium"] for e in events} == {GPU}
    assert ledger.diff(keys, []) == []           # nothing changed


def test_ledger_follows_tier_moves_and_dropped_leading_blocks() -> None:
    ledger = BlockLedger(BLOCK)
    ledger.learn(TOKENS)
    keys = block_keys(TOKENS, BLOCK)
    ledger.diff(keys, [])
    # the two leading blocks go to the CPU tier and leave the GPU
    moved = ledger.diff(keys[2:], keys[:2])
    assert moved[0] == {"type": "BlockRemoved", "block_hashes": sorted(block_hash(k) for k in keys[:2]), "medium": GPU}
    assert [(e["type"], e["medium"]) for e in moved[1:]] == [("BlockStored", CPU)] * 2
    # then they are dropped from the CPU tier too: the later blocks stay stored, their chain now starts
    # with missing parents (a prefix matcher scores the conversation as a miss here; it is recomputed)
    dropped = ledger.diff(keys[2:], [])
    assert dropped == [{"type": "BlockRemoved", "block_hashes": sorted(block_hash(k) for k in keys[:2]), "medium": CPU}]
    assert ledger.announced[GPU] == set(keys[2:]) and keys[0] not in ledger.known   # forgotten once gone
    snap = ledger.snapshot()
    assert snap[0] == {"type": "AllBlocksCleared"} and len(snap) == 3
    assert ledger.diff([], []) == [{"type": "BlockRemoved", "block_hashes": sorted(block_hash(k) for k in keys[2:]),
                                    "medium": GPU}]
    assert ledger.known == {}


def _receive(sub: zmq.Socket, until: float) -> list[dict]:
    events = []
    while time.monotonic() < until:
        if sub.poll(100):
            topic, seq, payload = sub.recv_multipart()
            ts, batch, rank = msgpack.unpackb(payload)
            assert len(seq) == 8 and isinstance(ts, float) and rank is None
            events += batch
    return events


def test_replica_publishes_its_cache(demo_weights: tuple) -> None:
    with replicas(demo_weights, 1, kv_events=True, blocks=64) as (rep,):
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.connect(rep.kv_events)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        time.sleep(0.3)   # the subscription reaches the publisher (a PUB socket drops what precedes it)
        body = {"model": "demo", "messages": [{"role": "user", "content": "one two three " * 12}], "max_tokens": 3,
                "return_token_ids": True}
        out = httpx.post(rep.url + "/v1/chat/completions", json=body, timeout=60).json()
        stored = [e for e in _receive(sub, time.monotonic() + 2.0) if e["type"] == "BlockStored"]
        ids = out["choices"][0]["prompt_token_ids"] + out["choices"][0]["token_ids"]
        full = (len(ids) - 1) // BLOCK   # the last sampled token has no KV yet
        assert [e["token_ids"] for e in stored][:full] == [ids[i * BLOCK:(i + 1) * BLOCK] for i in range(full)]
        assert [e["block_hashes"] for e in stored] == [[block_hash(k)] for k in block_keys(ids, BLOCK)[:len(stored)]]
        gpu, cpu = rep.engine.cached_block_keys()
        assert {block_hash(k) for k in gpu} >= {e["block_hashes"][0] for e in stored}
        # a streamed request (its outputs are deltas) under a cache salt (a salted chain of keys)
        messages = [{"role": "user", "content": "four five six " * 10}]
        prompt = httpx.post(rep.url + "/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
        generated: list[int] = []
        with httpx.stream("POST", rep.url + "/v1/chat/completions", timeout=60, json={
                "model": "demo", "messages": messages, "max_tokens": BLOCK + 2, "stream": True, "ignore_eos": True,
                "return_token_ids": True, "cache_salt": "tenant-x"}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        generated += choice.get("token_ids") or []
        assert len(generated) == BLOCK + 2
        keys = block_keys(prompt + generated, BLOCK, salt_root(cache_salt_for(None, "tenant-x")))
        salted = [e for e in _receive(sub, time.monotonic() + 2.0) if e["type"] == "BlockStored"]
        announced = {e["block_hashes"][0] for e in salted}
        assert {block_hash(k) for k in keys[:(len(prompt) + len(generated) - 1) // BLOCK]} <= announced
        assert announced <= {block_hash(k) for k in rep.engine.cached_block_keys()[0]}
        sub.close(0)


@pytest.mark.slow
def test_kv_aware_router_follows_the_events(demo_weights: tuple, tmp_path: Path) -> None:
    """A conversation held by replica k (sent to it directly) is routed to k by the router, by the blocks k
    announced; a chain naming its session stays on its replica."""
    with replicas(demo_weights, 3, kv_events=True, blocks=128) as reps, \
            router(reps, "kv_aware", tmp_path) as url:
        time.sleep(1.0)  # the router's subscriptions
        for k in (1, 2, 0):
            first = [{"role": "user", "content": f"conversation {k}: " + "red green blue " * 15}]
            reply = httpx.post(reps[k].url + "/v1/chat/completions", timeout=60,
                               json={"model": "demo", "messages": first, "max_tokens": 3}).json()
            time.sleep(0.5)
            turn = first + [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "and then?"}]
            routed = httpx.post(url + "/v1/chat/completions", timeout=60,
                                json={"model": "demo", "messages": turn, "max_tokens": 3})
            assert routed.headers["x-pensieve-replica"] == reps[k].name
            assert routed.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 3 * BLOCK
        seen = set()
        previous = None
        for _ in range(4):
            body = {"model": "demo", "input": "tell me more " * 5, "max_output_tokens": 3}
            if previous:
                body["previous_response_id"] = previous
            r = httpx.post(url + "/v1/responses", json=body, headers={"X-Session-ID": "chain-a"}, timeout=60)
            previous = r.json()["id"]
            seen.add(r.headers["x-pensieve-replica"])
        assert len(seen) == 1   # no forwarding needed: the session stayed where its chain is
