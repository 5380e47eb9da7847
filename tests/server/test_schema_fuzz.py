"""Schema fuzzing with schemathesis over the app's OpenAPI document: no input may cause a 5xx.

Besides schemathesis' own cases, each JSON body is also sent with one of its strings given a lone
UTF-16 surrogate, or one of its numbers made NaN or +-Infinity (written as the escapes and bare
literals Python's JSON parser accepts): classes of input that once returned 500."""
from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from tests.server.conftest import KEY_A, ServerHandle  # noqa: E402

_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
MUTATIONS = ("surrogate", "nan", "inf", "-inf")


def _leaves(node: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every string and number in a JSON value."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, path + (k,))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, path + (i,))]
    if isinstance(node, (str, int, float)) and not isinstance(node, bool):
        return [(path, node)]
    return []


def _mutated(body: dict[str, Any], mutation: str, rng: random.Random) -> dict[str, Any] | None:
    """A copy of `body` with one leaf made hostile; None when it has no leaf of the kind."""
    want = str if mutation == "surrogate" else (int, float)
    leaves = [(p, v) for p, v in _leaves(body) if isinstance(v, want)]
    if not leaves:
        return None
    path, value = rng.choice(leaves)
    new = (value[:1] + "\ud800" + value[1:] if mutation == "surrogate"
           else {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[mutation])
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return body


def _check_raw(server: ServerHandle, case, body: dict[str, Any]) -> int:
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    response = httpx.request(case.method, server.base_url + case.formatted_path, content=raw, timeout=60,
                             headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert response.status_code < 500, (case.method, case.path, raw[:500], response.text[:500])
    # valid JSON only: a non-finite number would be invalid in a client's parser
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} in a response to {raw[:300]!r}"))
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:], **strict)
    else:
        json.loads(response.text, **strict)
    if response.status_code >= 400:
        assert {"message", "type", "param", "code"} <= set(response.json()["error"])
    return response.status_code


def _check(case, server: ServerHandle) -> int:
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = "demo"  # a random name would stop every request at the 404 check
        # Bounded generation keeps the fuzzing fast; lengths are still validated (e.g. 0 or negative -> 400).
        for name in _LENGTH_FIELDS:
            if isinstance(case.body.get(name), int) and case.body[name] > 4:
                case.body[name] = 4
        if not any(name in case.body for name in _LENGTH_FIELDS):  # absent: up to the whole context
            case.body["max_output_tokens" if case.path == "/v1/responses" else "max_tokens"] = 4
    response = case.call(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error)
    return response.status_code


def test_no_server_errors(server: ServerHandle) -> None:
    # The pytest plugin's fixture loader does not work with this pytest, so each operation gets a
    # hypothesis test of its own here (same strategies, same checks).
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
    assert all(op.path != "/metrics" for op in operations)
    seen: Counter[int] = Counter()
    mutated: Counter[str] = Counter()
    for operation, mode in itertools.product(operations, GenerationMode):
        @given(case=operation.as_strategy(mode), mutation=st.sampled_from(MUTATIONS), seed=st.integers(0, 2**16))
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
        def fuzz(case, mutation: str, seed: int) -> None:
            seen[_check(case, server)] += 1
            if isinstance(case.body, dict) and (hostile := _mutated(case.body, mutation, random.Random(seed))):
                seen[_check_raw(server, case, hostile)] += 1
                mutated[mutation] += 1

        try:
            fuzz()
        except Unsatisfiable:  # e.g. GET /health has nothing to make invalid
            if mode is GenerationMode.POSITIVE:
                raise
    server.wait_idle()
    assert seen[200] > 0 and seen[400] > 0, seen  # both valid and invalid requests were exercised
    assert all(mutated[m] > 0 for m in MUTATIONS), mutated
