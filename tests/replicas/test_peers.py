"""A replica hands a turn continuing another replica's response to that replica (ids name their replica),
once; a conversation delete reaches every replica."""
from __future__ import annotations

import httpx
import openai
import pytest

from pensieve.server.peers import FORWARDED
from tests.loopback import free_port
from tests.replicas.conftest import BLOCK, replicas

LONG = "Tell me everything about the history of caches in computers, from drums to SRAM, in detail. " * 2


def test_a_turn_continuing_another_replicas_response_is_answered_there(demo_weights: tuple) -> None:
    with replicas(demo_weights, 2, blocks=128) as (a, b):
        first = openai.OpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0)
        r1 = first.responses.create(model="demo", input=LONG, max_output_tokens=3, temperature=0)
        assert r1.id.endswith(".replica-0")
        other = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
        raw = other.responses.with_raw_response.create(model="demo", input="And then?", previous_response_id=r1.id,
                                                       max_output_tokens=3, temperature=0)
        r2 = raw.parse()
        assert raw.headers["x-pensieve-replica"] == "replica-0, replica-1"   # answered by the owner, via b
        assert r2.usage.input_tokens_details.cached_tokens >= (r1.usage.input_tokens // BLOCK) * BLOCK - BLOCK
        # streamed turns and reads of the stored responses go to the owner as well
        events = list(other.responses.create(model="demo", input="More.", previous_response_id=r2.id,
                                             max_output_tokens=2, stream=True))
        assert events[-1].type == "response.completed" and events[-1].response.id.endswith(".replica-0")
        assert other.responses.retrieve(r1.id).output_text == r1.output_text
        other.responses.delete(r2.id)
        with pytest.raises(openai.NotFoundError):   # deleted on its owner
            first.responses.retrieve(r2.id)
        # a forwarded request is answered where it lands, never bounced again
        loop = httpx.post(b.url + "/v1/responses", headers={FORWARDED: "replica-0"}, timeout=30,
                          json={"model": "demo", "input": "x", "previous_response_id": r1.id})
        assert loop.status_code == 404 and loop.json()["error"]["code"] == "response_not_found"


def test_a_response_whose_replica_is_gone_is_a_clear_404(demo_weights: tuple) -> None:
    dead = f"http://127.0.0.1:{free_port()}"   # nothing listens there: replica-9 died with its stored responses
    with replicas(demo_weights, 1, blocks=64, extra_peers=(("replica-9", dead),)) as (alone,):
        client = openai.OpenAI(base_url=alone.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            client.responses.create(model="demo", input="more", previous_response_id="resp_abc.replica-9",
                                    max_output_tokens=2)
        assert info.value.body["code"] == "response_not_found" and info.value.body["param"] == "previous_response_id"
        assert "replica-9" in info.value.body["message"] and "resend" in info.value.body["message"]
        with pytest.raises(openai.NotFoundError):   # an id naming no known replica: plain not found
            client.responses.create(model="demo", input="more", previous_response_id="resp_abc.replica-7",
                                    max_output_tokens=2)


def test_deleting_a_conversation_reaches_every_replica(demo_weights: tuple) -> None:
    with replicas(demo_weights, 2, blocks=64) as reps:
        body = {"model": "demo", "messages": [{"role": "user", "content": LONG}], "max_tokens": 2,
                "conversation_id": "shared"}
        for rep in reps:   # the history was resent to both replicas over time
            assert httpx.post(rep.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        before = [rep.engine.stats().num_conversations for rep in reps]
        r = httpx.delete(reps[0].url + "/v1/conversations/shared", timeout=30)
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert [rep.engine.stats().num_conversations for rep in reps] == [n - 1 for n in before]
        assert httpx.delete(reps[1].url + "/v1/conversations/shared", timeout=30).status_code == 404
