"""What routers read from a replica: rendered token ids (equal to what generation uses), /tokenize, load and
the gauges under vLLM's names."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerHandle

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do caches live?"}]


def test_chat_render_gives_the_ids_the_engine_runs(server: ServerHandle) -> None:
    with server.http(key=None) as http:   # routers call these without the client's key
        rendered = http.post("/v1/chat/completions/render", json={"model": "demo", "messages": MESSAGES})
        tokenized = http.post("/tokenize", json={"model": "demo", "messages": MESSAGES})
    assert rendered.status_code == 200 and tokenized.status_code == 200
    ids = rendered.json()["token_ids"]
    assert tokenized.json()["tokens"] == ids and tokenized.json()["count"] == len(ids)
    with server.http() as http:
        out = http.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES, "max_tokens": 2,
                                                       "return_token_ids": True}).json()
    assert out["choices"][0]["prompt_token_ids"] == ids


def test_completion_and_response_render(server: ServerHandle) -> None:
    with server.http(key=None) as http:
        text = http.post("/v1/completions/render", json={"model": "demo", "prompt": "Hello there"}).json()
        ids = http.post("/v1/completions/render", json={"model": "demo", "prompt": [5, 6, 7]}).json()
        plain = http.post("/tokenize", json={"prompt": "Hello there"}).json()
        first = http.post("/v1/responses/render", json={"model": "demo", "input": "Where do caches live?",
                                                          "instructions": "Be brief."})
        stateful = http.post("/v1/responses/render", json={"model": "demo", "input": "and?",
                                                             "previous_response_id": "resp_x"})
        both = http.post("/tokenize", json={"prompt": "a", "messages": MESSAGES})
        detok = http.post("/detokenize", json={"tokens": plain["tokens"]}).json()
        bad = http.post("/detokenize", json={"tokens": [10**9]})
    assert text["token_ids"] == plain["tokens"] and ids["token_ids"] == [5, 6, 7]
    assert "Hello there" in detok["prompt"]
    with server.http(key=None) as http:
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert first.status_code == 200 and first.json()["token_ids"] == chat   # instructions become the system turn
    assert stateful.status_code == 400 and stateful.json()["error"]["param"] == "previous_response_id"
    assert both.status_code == 400 and bad.status_code == 400


def test_load_and_gateway_gauges(server: ServerHandle) -> None:
    server.wait_idle()
    with server.http(key=None) as http:
        assert http.get("/get_load").json() == {"load": 0}
        text = http.get("/metrics").text
    samples = {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples}
    stats = server.engine.stats()
    assert samples["vllm:num_requests_waiting"].value == 0
    assert samples["vllm:num_requests_running"].value == 0
    assert samples["vllm:kv_cache_usage_perc"].value == stats.gpu_blocks_used / stats.gpu_blocks_total
    assert samples["vllm:cpu_cache_usage_perc"].value == stats.cpu_blocks_used / stats.cpu_blocks_total
    info = samples["vllm:cache_config_info"].labels
    assert info == {"block_size": "16", "num_gpu_blocks": str(stats.gpu_blocks_total),
                    "num_cpu_blocks": str(stats.cpu_blocks_total)}
    tiers = {s.labels["tier"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == "pensieve_kv_cache_usage_perc"}
    assert set(tiers) == {"gpu", "cpu"} and samples["pensieve_kv_block_size"].value == 16
