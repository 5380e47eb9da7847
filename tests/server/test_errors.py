"""Bad input gets an OpenAI-style error with the right status, and the server goes on serving."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.server.conftest import KEY_A, MAX_MODEL_LEN, ServerHandle, assert_openai_error

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def test_malformed_json(http: httpx.Client) -> None:
    resp = http.post(CHAT, content=b'{"model": "demo", "messages": [', headers={"Content-Type": "application/json"})
    assert_openai_error(resp, 400, code="invalid_json")


@pytest.mark.parametrize("body, param", [
    ({"model": "demo"}, "messages"),
    ({"model": "demo", "messages": "hi"}, "messages"),
    ({"model": "demo", "messages": []}, "messages"),
    ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": MSG}, "model"),
    ({"model": "demo", "messages": MSG, "max_tokens": "many"}, "max_tokens"),
    ({"model": "demo", "messages": MSG, "temperature": -1}, "temperature"),
])
def test_missing_or_wrong_typed_fields(http: httpx.Client, body: dict, param: str) -> None:
    err = assert_openai_error(http.post(CHAT, json=body), 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_unknown_model(http: httpx.Client) -> None:
    assert_openai_error(http.post(CHAT, json={"model": "gpt-9", "messages": MSG}), 404, param="model",
                  code="model_not_found")
    assert_openai_error(http.post("/v1/responses", json={"model": "gpt-9", "input": "x"}), 404, code="model_not_found")


def test_prompt_longer_than_context(http: httpx.Client) -> None:
    long = [{"role": "user", "content": "word " * (2 * MAX_MODEL_LEN)}]
    err = assert_openai_error(http.post(CHAT, json={"model": "demo", "messages": long}), 400,
                        code="context_length_exceeded", says=str(MAX_MODEL_LEN))
    assert "tokens" in err["message"]
    assert_openai_error(http.post("/v1/completions", json={"model": "demo", "prompt": list(range(MAX_MODEL_LEN + 5))}),
                  400, code="context_length_exceeded")


@pytest.mark.parametrize("field, value", [("max_tokens", MAX_MODEL_LEN), ("max_tokens", 0), ("max_tokens", -3),
                                          ("max_completion_tokens", 10 * MAX_MODEL_LEN)])
def test_bad_max_tokens(http: httpx.Client, field: str, value: int) -> None:
    err = assert_openai_error(http.post(CHAT, json={"model": "demo", "messages": MSG, field: value}), 400, param=field)
    if value > 0:
        assert str(MAX_MODEL_LEN) in err["message"]


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"top_p": 5.0}, None), ({"top_k": -7}, None),
                                          ({"presence_penalty": 9}, None), ({"top_logprobs": 50}, "top_logprobs"),
                                          ({"stop": [""]}, "stop")])
def test_unsupported_sampling_values(http: httpx.Client, extra: dict, param: str | None) -> None:
    assert_openai_error(http.post(CHAT, json={"model": "demo", "messages": MSG, **extra}), 400, param=param)


def test_completions_bad_prompts(http: httpx.Client) -> None:
    url = "/v1/completions"
    assert_openai_error(http.post(url, json={"model": "demo", "prompt": ["a", "b"]}), 400, param="prompt",
                  code="unsupported_value")
    assert_openai_error(http.post(url, json={"model": "demo", "prompt": [10 ** 7]}), 400, param="prompt")
    assert_openai_error(http.post(url, json={"model": "demo", "prompt": []}), 400)
    assert_openai_error(http.post(url, json={"model": "demo", "prompt": ""}), 400, code="invalid_prompt")


def test_unknown_previous_response(http: httpx.Client) -> None:
    resp = http.post("/v1/responses", json={"model": "demo", "input": "x", "previous_response_id": "resp_nope"})
    assert_openai_error(resp, 404, param="previous_response_id", code="response_not_found")
    assert_openai_error(http.get("/v1/responses/resp_nope"), 404)
    assert_openai_error(http.delete("/v1/responses/resp_nope"), 404)


def test_api_keys(server: ServerHandle, http: httpx.Client) -> None:
    body = {"model": "demo", "messages": MSG, "max_tokens": 1}
    with server.http(None) as anonymous:
        assert_openai_error(anonymous.post(CHAT, json=body), 401, code="invalid_api_key")
        assert_openai_error(anonymous.get("/v1/models"), 401)
        assert anonymous.get("/health").status_code == 200
        assert anonymous.post(CHAT, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.post(CHAT, json=body, headers={"Authorization": f"Basic {KEY_A}"}).status_code == 401


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get(CHAT), 405)


def test_overloaded_gives_503_with_retry_after(server: ServerHandle) -> None:
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    # A second app over the same engine that admits no waiting request at all (the engine idles at 0).
    app = build_app(server.engine, ServerSettings(max_waiting=0, retry_after_s=3, served_model_names=("demo",)))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(CHAT, json={"model": "demo", "messages": MSG})

    resp = asyncio.run(go())
    assert_openai_error(resp, 503, code="overloaded")
    assert resp.headers["retry-after"] == "3"
