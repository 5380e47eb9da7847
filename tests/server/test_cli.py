"""The `pensieve` console script: chat piped through stdin, serve with a graceful SIGINT."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pensieve.cli import build_parser, parse_api_keys
from tests.loopback import free_port
from tests.server.conftest import KEY_A, ServerHandle

CLI = [sys.executable, "-m", "pensieve.cli"]
SMALL_ENGINE = ["--device", "cpu", "--dtype", "float32", "--num-gpu-blocks", "64", "--num-cpu-blocks", "64",
                "--max-model-len", "256"]


def test_api_keys_parsing() -> None:
    assert parse_api_keys(["a,b", "c", "a"], None) == ("a", "b", "c")
    assert parse_api_keys(None, "x, y") == ("x", "y")
    assert parse_api_keys(["flag"], "env") == ("flag",)
    assert parse_api_keys(None, None) == ()


def test_serve_flags_named_like_vllm() -> None:
    args = build_parser().parse_args(["serve", "--port", "9000", "--max-num-seqs", "8", "--cache-mode", "gpu",
                                      "--served-model-name", "a", "b", "--api-key", "k1", "--api-key", "k2,k3"])
    assert (args.model, args.host, args.port, args.max_num_seqs, args.cache_mode) == (None, "127.0.0.1", 9000, 8, "gpu")
    assert args.served_model_name == ["a", "b"] and parse_api_keys(args.api_key, None) == ("k1", "k2", "k3")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])


def _cached_counts(output: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"\[cached (\d+)/(\d+) prompt tokens \| TTFT \d+ ms\]", output)]


def _run_chat(extra: list[str], stdin: str, timeout: float) -> str:
    proc = subprocess.run(CLI + ["chat", "--max-tokens", "6", "--temperature", "0", *extra], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PENSIEVE_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_chat_against_server(server: ServerHandle) -> None:
    out = _run_chat(["--url", server.api_url, "--api-key", KEY_A, "--system", "Be brief."],
                    "Hello, tell me about the weather today please.\n\nAnd tomorrow?\n/exit\nnever sent\n", 60)
    counts = _cached_counts(out)
    assert len(counts) == 2, out  # the empty line is skipped, /exit stops before the last line
    assert counts[1][0] > 0 and counts[1][1] > counts[0][1]  # turn 2 reuses turn 1's prompt
    assert out.count("assistant> ") == 2


def test_chat_in_process_eof_quits() -> None:
    out = _run_chat(SMALL_ENGINE, "Hello, tell me about the weather today please.\nAnd tomorrow, what then?\n", 120)
    counts = _cached_counts(out)
    assert len(counts) == 2, out
    # In-process turns append token ids: all of turn 1's full blocks are reused.
    assert counts[1][0] >= 16 and counts[1][0] < counts[1][1]


def test_serve_then_sigint_with_a_stream_in_flight() -> None:
    """Ctrl-C; SIGTERM, with both engines and every kind of request, is test_shutdown.py's."""
    port = free_port()
    proc = subprocess.Popen(CLI + ["serve", *SMALL_ENGINE, "--port", str(port),
                                   "--shutdown-timeout", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PENSIEVE_API_KEY": "env-key"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        headers = {"Authorization": "Bearer env-key"}
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401  # the env key is enforced
        names = [m["id"] for m in httpx.get(f"{base}/v1/models", headers=headers).json()["data"]]
        assert names[0] == "pensieve-demo"  # no MODEL: the demo model under a short name
        body = {"model": names[0],
                "messages": [{"role": "user", "content": "A long story, please."}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data:")
            proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            try:
                for _ in lines:  # the stream ends (cut or finished) instead of hanging
                    pass
            except httpx.HTTPError:
                pass
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_an_unusable_kv_cache_in_one_line(tmp_path) -> None:
    """An unwritable --kv-cache-path (found at start, not at shutdown), and with --kv-cache-strict a
    damaged save: one line on stderr and exit status 1, never a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    damaged = tmp_path / "kv"
    damaged.mkdir()
    (damaged / "CURRENT").write_text("save-0123456789abcdef\n")   # names a save that is not there
    cases = [(["--kv-cache-path", str(blocker)], "not writable"),
             (["--kv-cache-path", str(damaged), "--kv-cache-strict"], "index.json is missing")]
    for flags, says in cases:
        proc = subprocess.run(CLI + ["serve", *SMALL_ENGINE, "--port", str(free_port()), "--log-level", "warning",
                                     *flags], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PENSIEVE_API_KEY": ""})
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("pensieve serve: error:")]
        assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
