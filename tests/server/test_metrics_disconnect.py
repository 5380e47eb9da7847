"""/metrics is valid Prometheus text whose numbers move; a client that hangs up frees its blocks."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pensieve.engine.llm_engine import STEP_PATHS
from tests.server.conftest import ServerHandle


def scrape(server: ServerHandle) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move(server: ServerHandle) -> None:
    before = scrape(server)
    for name in ("pensieve_num_requests_running", "pensieve_num_requests_waiting", "pensieve_gpu_blocks_total",
                 "pensieve_gpu_blocks_used", "pensieve_gpu_blocks_cached", "pensieve_cpu_blocks_total",
                 "pensieve_cpu_blocks_used", "pensieve_recomputed_tokens_total", "pensieve_swapped_in_blocks_total",
                 "pensieve_swapped_out_blocks_total", "pensieve_dropped_blocks_total"):
        assert any(key[0] == name for key in before), name
    assert value(before, "pensieve_gpu_blocks_total") == 256 and value(before, "pensieve_cpu_blocks_total") == 256

    messages = [{"role": "user", "content": "Metrics, please, with a reasonably long question attached to it."}]
    client = server.client()
    for _ in range(2):  # the second one hits the first one's cache
        client.chat.completions.create(model="demo", messages=messages, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    after = scrape(server)
    endpoint = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert value(after, "pensieve_http_requests_total", **endpoint) == \
        value(before, "pensieve_http_requests_total", **endpoint) + 2
    assert value(after, "pensieve_request_e2e_seconds_count", endpoint="/v1/chat/completions") >= 2
    assert value(after, "pensieve_time_to_first_token_seconds_count") == \
        value(before, "pensieve_time_to_first_token_seconds_count") + 2
    # 4 tokens per request: 3 gaps each
    assert value(after, "pensieve_inter_token_latency_seconds_count") == \
        value(before, "pensieve_inter_token_latency_seconds_count") + 6
    assert value(after, "pensieve_generation_tokens_total") == value(before, "pensieve_generation_tokens_total") + 8
    gpu_hits = "pensieve_hit_tokens_total"
    assert value(after, gpu_hits, tier="gpu") > value(before, gpu_hits, tier="gpu")
    assert ("pensieve_hit_tokens_total", (("tier", "cpu"),)) in after
    assert value(after, "pensieve_num_requests_running") == 0
    # engine steps by path: on the CPU every step runs eagerly
    steps = sum(value(after, "pensieve_engine_steps_total", path=p) - value(before, "pensieve_engine_steps_total", path=p)
                for p in STEP_PATHS)
    assert steps >= 8 and value(after, "pensieve_engine_step_seconds_total", path="eager") > 0


def test_errors_are_counted_by_status(server: ServerHandle) -> None:
    before = value(scrape(server), "pensieve_http_requests_total", endpoint="/v1/chat/completions", status="404")
    with server.http() as http:
        assert http.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code in (400, 404)
        assert http.post("/v1/chat/completions",
                         json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    after = value(scrape(server), "pensieve_http_requests_total", endpoint="/v1/chat/completions", status="404")
    assert after == before + 1


def test_client_disconnect_mid_stream_frees_blocks(server: ServerHandle) -> None:
    server.wait_idle()
    generated_before = server.engine.stats().generation_tokens
    body = {"model": "demo", "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            for line in resp.iter_lines():
                seen += line.startswith("data:")
                if seen >= 4:
                    break
            assert server.engine.stats().num_running == 1
        # leaving the block closes the connection mid-stream
    stats = server.wait_idle(timeout=20)
    assert stats.gpu_blocks_used == 0  # every block is free or cached again
    assert stats.gpu_blocks_used + stats.gpu_blocks_cached <= stats.gpu_blocks_total
    assert stats.generation_tokens - generated_before < 400  # aborted, not run to the end
    samples = scrape(server)
    assert value(samples, "pensieve_num_requests_running") == 0
    assert value(samples, "pensieve_gpu_blocks_used") == 0
    assert not server.app.state.pensieve.in_flight


def test_non_streaming_client_timeout_aborts(server: ServerHandle) -> None:
    server.wait_idle()
    generated_before = server.engine.stats().generation_tokens
    body = {"model": "demo", "messages": [{"role": "user", "content": "Another long story."}], "max_tokens": 400,
            "ignore_eos": True}
    with server.http() as http:
        try:
            http.post("/v1/chat/completions", json=body, timeout=0.5)
        except httpx.TimeoutException:
            pass
    stats = server.wait_idle(timeout=20)
    assert stats.gpu_blocks_used == 0
    assert stats.generation_tokens - generated_before < 400
