"""Schema fuzzing with schemathesis over the app's OpenAPI document: no input may cause a 5xx."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from tests.server.conftest import KEY_A, ServerHandle  # noqa: E402

_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


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
    for operation, mode in itertools.product(operations, GenerationMode):
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            seen[_check(case, server)] += 1

        try:
            fuzz()
        except Unsatisfiable:  # e.g. GET /health has nothing to make invalid
            if mode is GenerationMode.POSITIVE:
                raise
    server.wait_idle()
    assert seen[200] > 0 and seen[400] > 0, seen  # both valid and invalid requests were exercised
