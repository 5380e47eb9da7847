"""SIGTERM on a real `pensieve serve` with requests in flight: what fits in the grace finishes, every
stream left ends with an OpenAI error event and [DONE] (Responses: its `error` event), a
non-streaming request gets an OpenAI-shaped 503, nothing new is accepted, the cache is saved. A
damaged saved cache at start costs one log line, never a traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pensieve.model.tiny_llama import tiny_llama_path
from pensieve.replicas.launcher import wait_http_ok
from tests.loopback import free_port

CLI = [sys.executable, "-m", "pensieve.cli"]
MODEL = str(tiny_llama_path())   # served under its path
GRACE_S = 3.0
LONG = 4000   # tokens: far more than the grace allows on this CPU (900 once finished inside it)


def _in_thread(fn) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported by the test's assertions
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _result(job: tuple[threading.Thread, dict[str, Any]]) -> Any:
    assert "result" in job[1], job[1]       # the exception, when the request raised
    return job[1]["result"]


@pytest.mark.parametrize("engine_flags", [[], ["--engine-process"]], ids=["engine-thread", "engine-process"])
def test_sigterm_drains_then_ends_every_request_cleanly(tmp_path: Path, engine_flags: list[str]) -> None:
    cache = tmp_path / "kv"
    cache.mkdir()
    (cache / "CURRENT").write_text("not a save\n")          # a damaged cache: one line, an empty start
    log = tmp_path / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            CLI + ["serve", MODEL, "--device", "cpu", "--dtype", "float32", "--num-gpu-blocks-override", "1024",
                   "--num-cpu-blocks", "64", "--max-model-len", "4096", "--max-num-seqs", "8", "--port", str(port),
                   "--shutdown-timeout", str(GRACE_S), "--kv-cache-path", str(cache), "--log-level", "info",
                   *engine_flags],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PENSIEVE_API_KEY": ""})
    try:
        wait_http_ok(f"{base}/health", 120, proc, log)
        http = httpx.Client(base_url=base, timeout=120)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "A long story, please."}],
                "ignore_eos": True, "temperature": 0}
        first_events = threading.Semaphore(0)

        def stream(path: str, body: dict) -> list[str]:
            lines = []
            with http.stream("POST", path, json=body) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line.startswith("data:") and len(lines) == 1:
                        first_events.release()     # generation is under way
                    if line:
                        lines.append(line)
            return lines

        long_stream = _in_thread(lambda: stream("/v1/chat/completions", {**chat, "max_tokens": LONG, "stream": True}))
        responses_stream = _in_thread(lambda: stream("/v1/responses", {
            "model": MODEL, "input": "Another long story.", "max_output_tokens": LONG, "stream": True,
            "ignore_eos": True}))
        long_whole = _in_thread(lambda: http.post("/v1/completions", json={
            "model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True}))
        for _ in range(2):
            assert first_events.acquire(timeout=60)
        # the short one streams too, so the signal waits until it is admitted and generating
        short = _in_thread(lambda: stream("/v1/chat/completions", {**chat, "max_tokens": 32, "stream": True}))
        assert first_events.acquire(timeout=60)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):                # nothing new is accepted
            httpx.post(f"{base}/v1/chat/completions", json={**chat, "max_tokens": 1}, timeout=5)

        for t, _ in (long_stream, responses_stream, long_whole, short):
            t.join(timeout=GRACE_S + 30)
        ended = time.monotonic() - signalled
        assert GRACE_S - 0.5 < ended < GRACE_S + 15

        # what fitted in the grace finished normally
        done = _result(short)
        assert done[-1] == "data: [DONE]"
        assert json.loads(done[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"

        # a stream cut at the end of the grace: an OpenAI error event, then [DONE]
        lines = _result(long_stream)
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert err["code"] == "server_shutting_down" and err["type"] == "service_unavailable_error"
        assert any('"content"' in line for line in lines[:-2])  # it had streamed text before

        # the Responses API's own error event
        events = _result(responses_stream)
        assert events[-2] == "event: error"
        assert json.loads(events[-1].removeprefix("data: "))["code"] == "server_shutting_down"

        # a non-streaming request: an OpenAI-shaped 503
        whole = _result(long_whole)
        assert whole.status_code == 503, whole.text
        assert whole.json()["error"]["code"] == "server_shutting_down"
        assert set(whole.json()["error"]) == {"message", "type", "param", "code"}

        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.count("ignoring the saved KV cache") == 1, text[-3000:]
    assert "saved " in text and "cached KV blocks" in text           # the cache was saved at the end
    saved = cache / (cache / "CURRENT").read_text().strip()
    assert (saved / "index.json").exists() and (saved / "kv.0.bin").exists()
