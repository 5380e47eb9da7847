"""Tenant isolation through the real server, two API keys: no key can hit, probe or delete another's
KV, and `cache_salt` isolates callers that share one key. /metrics can ask for a key."""
from __future__ import annotations

import asyncio
import secrets

import httpx

from tests.server.conftest import KEY_A, KEY_B, ServerHandle


def _secret() -> str:
    """A prompt no other test has sent: several 16-token blocks of words nobody else knows."""
    words = [secrets.token_hex(3) for _ in range(40)]
    return " ".join(words) + " is my password hint"


def _chat_cached(server: ServerHandle, key: str, text: str, **extra) -> int:
    resp = server.client(key).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": text}], max_tokens=1, temperature=0, **extra)
    return resp.usage.prompt_tokens_details.cached_tokens


def test_another_key_never_hits_a_secret_prompt(server: ServerHandle) -> None:
    b = server.client(KEY_B)

    def chat(secret: str) -> int:
        return _chat_cached(server, KEY_B, secret)

    def completion(secret: str) -> int:   # the same token ids as A's chat prompt
        ids = server.engine.tokenizer.apply_chat_template([{"role": "user", "content": secret}], tokenize=True,
                                                          add_generation_prompt=True, return_dict=False)
        resp = b.completions.create(model="demo", prompt=ids, max_tokens=1, temperature=0)
        return resp.usage.prompt_tokens_details.cached_tokens

    def response(secret: str) -> int:
        resp = b.responses.create(model="demo", input=secret, max_output_tokens=1, store=False)
        return resp.usage.input_tokens_details.cached_tokens

    # B probes with A's exact prompt by each endpoint: nothing comes from A's cache, so there is
    # nothing to read from cached_tokens or from the time to the first token
    for probe in (chat, completion, response):
        secret = _secret()
        assert _chat_cached(server, KEY_A, secret) == 0
        owner_again = _chat_cached(server, KEY_A, secret)
        assert owner_again >= 32                                  # the owner's second request hits
        assert probe(secret) == 0, probe.__name__
        assert chat(secret) == owner_again                        # B's own repeat hits: isolation, not no cache


def test_cache_salt_isolates_callers_of_one_key(server: ServerHandle) -> None:
    secret = _secret()
    assert _chat_cached(server, KEY_A, secret, extra_body={"cache_salt": "user-1"}) == 0
    assert _chat_cached(server, KEY_A, secret, extra_body={"cache_salt": "user-2"}) == 0
    assert _chat_cached(server, KEY_A, secret) == 0                # no salt is a salt of its own
    assert _chat_cached(server, KEY_A, secret, extra_body={"cache_salt": "user-1"}) >= 32
    # the same salt under another key is still another tenant
    assert _chat_cached(server, KEY_B, secret, extra_body={"cache_salt": "user-1"}) == 0

    a = server.client(KEY_A)
    prompt = [int(t) % 900 + 10 for t in secrets.token_bytes(64)]
    first = a.completions.create(model="demo", prompt=prompt, max_tokens=1, extra_body={"cache_salt": "s"})
    other = a.completions.create(model="demo", prompt=prompt, max_tokens=1, extra_body={"cache_salt": "t"})
    same = a.completions.create(model="demo", prompt=prompt, max_tokens=1, extra_body={"cache_salt": "s"})
    assert first.usage.prompt_tokens_details.cached_tokens == other.usage.prompt_tokens_details.cached_tokens == 0
    assert same.usage.prompt_tokens_details.cached_tokens >= 48
    r1 = a.responses.create(model="demo", input=secret, max_output_tokens=1, extra_body={"cache_salt": "r"})
    r2 = a.responses.create(model="demo", input=secret, max_output_tokens=1, extra_body={"cache_salt": "q"},
                            store=False)
    r3 = a.responses.create(model="demo", input=secret, max_output_tokens=1, extra_body={"cache_salt": "r"},
                            store=False)
    assert r1.usage.input_tokens_details.cached_tokens == r2.usage.input_tokens_details.cached_tokens == 0
    assert r3.usage.input_tokens_details.cached_tokens >= 32


def test_another_key_cannot_delete_a_tenants_blocks(server: ServerHandle) -> None:
    """B sends A's text under a named conversation and deletes it: A's cache stays whole."""
    secret = _secret()
    _chat_cached(server, KEY_A, secret)
    before = _chat_cached(server, KEY_A, secret)
    assert before >= 32
    b = server.client(KEY_B)
    b.chat.completions.create(model="demo", messages=[{"role": "user", "content": secret}], max_tokens=1,
                              extra_body={"conversation_id": "steal"})
    with server.http(KEY_B) as http:
        assert http.delete("/v1/conversations/steal").status_code == 200
        # and A's own conversation names are not B's to delete
        assert http.delete("/v1/conversations/nonexistent-of-a").status_code == 404
    server.wait_idle()
    assert _chat_cached(server, KEY_A, secret) == before


def test_metrics_can_require_a_key(server: ServerHandle) -> None:
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    with httpx.Client(base_url=server.base_url) as anonymous:
        assert anonymous.get("/metrics").status_code == 200           # default: open, like /health
    app = build_app(server.engine, ServerSettings(api_keys=(KEY_A,), metrics_require_auth=True,
                                                  served_model_names=("demo",)))

    async def scrape(headers: dict[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/metrics", headers=headers)

    refused = asyncio.run(scrape({}))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    ok = asyncio.run(scrape({"Authorization": f"Bearer {KEY_A}"}))
    assert ok.status_code == 200 and "pensieve_num_requests_running" in ok.text
