"""Hostile input gets an OpenAI-shaped 4xx, never a 5xx: lone UTF-16 surrogates in any string,
NaN and infinities in any float, bodies over the size limit; nothing non-finite is ever sent back;
/health answers while a large request is handled."""
from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import httpx
import pytest

from tests.server.conftest import ServerHandle, assert_openai_error

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
LONE = "\ud800x"   # a high surrogate with no low one: JSON can carry it ("\ud800"), UTF-8 cannot


def _post_raw(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    # ensure_ascii writes the surrogate as the escape "\ud800" (httpx's own encoder would refuse it);
    # allow_nan writes NaN / Infinity as the bare literals Python's parser accepts
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    return http.post(path, content=raw, headers={"Content-Type": "application/json"})


def _msg(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


SURROGATES = {
    "chat content": (CHAT, {"model": "demo", "messages": _msg(LONE)}),
    "chat content part": (CHAT, {"model": "demo", "messages": _msg([{"type": "text", "text": LONE}])}),
    "chat name": (CHAT, {"model": "demo", "messages": [{"role": "user", "content": "hi", "name": LONE}]}),
    "chat model": (CHAT, {"model": LONE, "messages": _msg("hi")}),
    "chat stop": (CHAT, {"model": "demo", "messages": _msg("hi"), "stop": [LONE]}),
    "chat conversation_id": (CHAT, {"model": "demo", "messages": _msg("hi"), "conversation_id": LONE}),
    "chat cache_salt": (CHAT, {"model": "demo", "messages": _msg("hi"), "cache_salt": LONE}),
    "completions prompt": (COMPLETIONS, {"model": "demo", "prompt": LONE}),
    "completions prompt list": (COMPLETIONS, {"model": "demo", "prompt": [LONE]}),
    "completions stop": (COMPLETIONS, {"model": "demo", "prompt": "hi", "stop": LONE}),
    "responses input": (RESPONSES, {"model": "demo", "input": LONE}),
    "responses input message": (RESPONSES, {"model": "demo", "input": [{"role": "user", "content": LONE}]}),
    "responses instructions": (RESPONSES, {"model": "demo", "input": "hi", "instructions": LONE}),
    "responses model": (RESPONSES, {"model": LONE, "input": "hi"}),
    "responses previous_response_id": (RESPONSES, {"model": "demo", "input": "hi", "previous_response_id": LONE}),
}


@pytest.mark.parametrize("where", list(SURROGATES))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_lone_surrogates_are_refused(http: httpx.Client, where: str, stream: bool) -> None:
    path, body = SURROGATES[where]
    err = assert_openai_error(_post_raw(http, path, {**body, "max_tokens": 2, "stream": stream}), 400)
    assert "surrogate" in err["message"]


@pytest.mark.parametrize("ids", [[5, 10**6], [-1, 5], [5, 2**63 - 1]], ids=["past-vocab", "negative", "huge"])
def test_token_ids_outside_the_vocabulary_are_refused(http: httpx.Client, ids: list[int]) -> None:
    err = assert_openai_error(_post_raw(http, COMPLETIONS, {"model": "demo", "prompt": ids, "max_tokens": 2}), 400)
    assert "token" in err["message"].lower() or "prompt" in err["message"]


FLOATS = {CHAT: ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"),
          COMPLETIONS: ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"),
          RESPONSES: ("temperature", "top_p")}
BASE = {CHAT: {"model": "demo", "messages": _msg("hi"), "max_tokens": 2},
        COMPLETIONS: {"model": "demo", "prompt": "hi", "max_tokens": 2},
        RESPONSES: {"model": "demo", "input": "hi", "max_output_tokens": 2}}


@pytest.mark.parametrize("path, name", [(p, n) for p, names in FLOATS.items() for n in names])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused(http: httpx.Client, path: str, name: str, value: float) -> None:
    err = assert_openai_error(_post_raw(http, path, {**BASE[path], name: value, "logprobs": 1
                                                      if path == COMPLETIONS else path == CHAT}), 400)
    assert err["param"] == name


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-finite number {constant} in a response")

    return json.loads(text, parse_constant=refuse)


def test_logprobs_are_always_finite(http: httpx.Client) -> None:
    """Finite but extreme values (a repetition penalty of 1e-38 at temperature 1e-4) make the logits
    inf and every logprob NaN: the reply still carries finite logprobs (vLLM's -9999.0 for -inf) and
    valid JSON."""
    body = {"model": "demo", "messages": _msg("say say say say"), "max_tokens": 3, "repetition_penalty": 1e-38,
            "logprobs": True, "top_logprobs": 3, "temperature": 1e-4}
    whole = http.post(CHAT, json=body)
    assert whole.status_code == 200, whole.text
    content = _strict_json(whole.text)["choices"][0]["logprobs"]["content"]
    values = [c["logprob"] for c in content] + [t["logprob"] for c in content for t in c["top_logprobs"]]
    assert values and all(math.isfinite(v) and v <= 0 for v in values)
    assert -9999.0 in values                                       # the NaNs, floored
    with http.stream("POST", CHAT, json={**body, "stream": True}) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [_strict_json(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks)
    comp = http.post(COMPLETIONS, json={"model": "demo", "prompt": "say say say", "max_tokens": 3, "logprobs": 2,
                                        "repetition_penalty": 1e-38, "temperature": 1e-4})
    assert comp.status_code == 200 and _strict_json(comp.text)["choices"][0]["logprobs"]["token_logprobs"]


def test_a_body_over_the_limit_gets_413(server: ServerHandle, http: httpx.Client) -> None:
    limit = server.app.state.pensieve.settings.max_request_body_bytes
    big = {"model": "demo", "messages": _msg("x" * (limit + 10))}
    err = assert_openai_error(http.post(CHAT, json=big), 413)
    assert err["code"] == "request_too_large" and str(limit) in err["message"]

    def chunks():   # no Content-Length: counted as it arrives
        yield b'{"model": "demo", "prompt": "'
        for _ in range(limit // (1 << 16) + 2):
            yield b"y" * (1 << 16)
        yield b'"}'

    resp = http.post(COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"})
    assert assert_openai_error(resp, 413)["code"] == "request_too_large"


def _health_while(server: ServerHandle, work) -> tuple[Any, list[float]]:
    """Runs `work()` while another thread times /health every 50 ms; returns its result and the times (at
    least one: the poller connects before the work starts, then times requests until one ends after it)."""
    times: list[float] = []
    failures: list[BaseException] = []
    ready, done = threading.Event(), threading.Event()

    def poll() -> None:
        try:
            with httpx.Client(base_url=server.base_url, timeout=30) as c:
                c.get("/health")
                ready.set()
                while True:
                    start = time.perf_counter()
                    assert c.get("/health").status_code == 200
                    times.append(time.perf_counter() - start)
                    if done.is_set():
                        return
                    time.sleep(0.05)
        except BaseException as exc:  # a thread's exception would vanish: hand it to the test
            failures.append(exc)
            ready.set()

    poller = threading.Thread(target=poll)
    poller.start()
    ready.wait(30)
    try:
        result = work()
    finally:
        done.set()
        poller.join()
    if failures:
        raise failures[0]
    return result, times


def test_health_answers_while_a_huge_prompt_is_refused(server: ServerHandle, http: httpx.Client) -> None:
    """A prompt just under the body limit: refused for its length after tokenizing only its head (the
    whole of it would take the demo tokenizer about 20 s), on a worker thread."""
    text = "hello world, and more words " * ((server.app.state.pensieve.settings.max_request_body_bytes - 1000) // 28)
    start = time.perf_counter()
    resp, times = _health_while(server, lambda: http.post(COMPLETIONS, json={"model": "demo", "prompt": text}))
    assert assert_openai_error(resp, 400)["code"] == "context_length_exceeded"
    assert time.perf_counter() - start < 10
    assert times and max(times) < 1.0


def test_tokenization_runs_off_the_event_loop(server: ServerHandle, http: httpx.Client, monkeypatch) -> None:
    """While one request's template is rendered and tokenized (made slow here: 2 s), /health answers."""
    tokenizer = server.engine.tokenizer
    real = tokenizer.apply_chat_template

    def slow(*args, **kwargs):
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", slow)
    resp, times = _health_while(server, lambda: http.post(CHAT, json={"model": "demo", "messages": _msg("hi"),
                                                                      "max_tokens": 1}))
    assert resp.status_code == 200
    assert len(times) >= 5 and max(times) < 0.5, times
