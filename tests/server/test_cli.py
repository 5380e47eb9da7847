"""The `pensieve` console script: chat piped through stdin, serve with a graceful SIGINT."""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pensieve.cli import HelpFormatter, build_parser, engine_config_from_args, parse_api_keys
from pensieve.errors import UsageError
from pensieve.replicas.launcher import wait_http_ok
from tests.loopback import free_port
from tests.server.conftest import KEY_A, ServerHandle

CLI = [sys.executable, "-m", "pensieve.cli"]
SMALL_ENGINE = ["--device", "cpu", "--dtype", "float32", "--num-gpu-blocks-override", "64", "--num-cpu-blocks", "64",
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


def _config(*flags: str):
    return engine_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_model_positional_or_flag() -> None:
    assert _config("/m").model.model == "/m" and _config("--model", "/m").model.model == "/m"
    assert _config("/m", "--model", "/m").model.model == "/m"
    with pytest.raises(UsageError, match="two models"):
        _config("/a", "--model", "/b")


def test_vllm_prefix_caching_flags_map_to_cache_modes() -> None:
    assert _config("/m").cache.cache_mode == "tiered"
    assert _config("/m", "--no-enable-prefix-caching").cache.cache_mode == "stateless"
    assert _config("/m", "--enable-prefix-caching", "--cache-mode", "gpu").cache.cache_mode == "gpu"
    for contradiction in (["--no-enable-prefix-caching", "--cache-mode", "tiered"],
                          ["--enable-prefix-caching", "--cache-mode", "stateless"]):
        with pytest.raises(UsageError):
            _config("/m", *contradiction)
    c = _config("/m", "--kv-offloading-size", "2", "--num-gpu-blocks-override", "7", "--no-async-scheduling")
    assert (c.cache.cpu_cache_gb, c.cache.num_gpu_blocks, c.async_scheduling) == (2.0, 7, False)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in parser._actions for flag in a.option_strings}


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser(with_bench=True)._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_one_flag_name_per_concept_across_commands() -> None:
    cmds = _commands()
    serve, chat, bench = (_options(cmds[c]) for c in ("serve", "chat", "bench"))
    # chat runs the same engine as serve, with the same flags
    assert {f for f, a in serve.items() if a.container.title in ("engine", "KV cache")} <= set(chat)
    # bench's engine and system flags are serve's where serve has the concept
    shared = {"--model", "--tokenizer", "--dtype", "--device", "--max-model-len", "--block-size",
              "--num-gpu-blocks-override", "--gpu-memory-utilization", "--kv-offloading-size", "--num-cpu-blocks",
              "--eviction-policy", "--max-num-seqs", "--max-num-batched-tokens", "--enforce-eager",
              "--async-scheduling", "--no-async-scheduling", "--served-model-name", "--api-key", "--engine-process"}
    assert shared <= set(bench) and shared <= set(serve)
    for old in ("--served-model", "--cpu-kv-gb", "--cpu-cache-gb", "--num-gpu-blocks"):  # the names they replaced
        assert old not in bench and old not in serve and old not in chat
    assert bench["--async-scheduling"].nargs == 0 and serve["--async-scheduling"].nargs == 0  # a switch in both


def test_help_shows_every_default() -> None:
    for name, parser in _commands().items():
        assert isinstance(parser._get_formatter(), HelpFormatter), name
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                entry = parser._get_formatter()._format_action(action)  # the option's lines in --help
                assert "default" in entry, (name, entry)
    assert "tokens per KV block (default: 16)" in " ".join(_commands()["serve"].format_help().split())


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


@pytest.fixture(scope="module")
def tiny_model() -> str:
    from pensieve.model.tiny_llama import tiny_llama_path

    return str(tiny_llama_path())


def test_chat_in_process_eof_quits(tiny_model: str) -> None:
    out = _run_chat([tiny_model, *SMALL_ENGINE], "Hello, tell me about the weather today please.\nAnd tomorrow, what then?\n", 120)
    counts = _cached_counts(out)
    assert len(counts) == 2, out
    # In-process turns append token ids: all of turn 1's full blocks are reused.
    assert counts[1][0] >= 16 and counts[1][0] < counts[1][1]


def test_serve_then_sigint_with_a_stream_in_flight(tiny_model: str) -> None:
    """Ctrl-C; SIGTERM, with both engines and every kind of request, is test_shutdown.py's."""
    port = free_port()
    proc = subprocess.Popen(CLI + ["serve", "--model", tiny_model, *SMALL_ENGINE, "--port", str(port),
                                   "--shutdown-timeout", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PENSIEVE_API_KEY": "env-key"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/health", 120, proc)
        headers = {"Authorization": "Bearer env-key"}
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401  # the env key is enforced
        names = [m["id"] for m in httpx.get(f"{base}/v1/models", headers=headers).json()["data"]]
        assert names == [tiny_model]  # a model given: served under its path
        body = {"model": names[0],
                "messages": [{"role": "user", "content": "A long story, please."}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data:")
            proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            events = [line for line in lines if line.startswith("data:")]  # the stream ends instead of hanging
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 20
        # it ended cleanly: finished, or cut with an error event; [DONE] either way, no traceback
        assert events[-1] == "data: [DONE]"
        finished = any('"finish_reason": "length"' in e for e in events)
        assert finished or any('"error"' in e for e in events[-3:]), events[-3:]
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_model_serves_the_demo_model_under_its_name() -> None:
    from pensieve.cli import _served_names
    from pensieve.demo import DEMO_SERVED_NAME, demo_gguf_path

    pytest.importorskip("gguf")
    try:
        path = str(demo_gguf_path())
    except Exception as exc:  # noqa: BLE001 - not installed here
        pytest.skip(str(exc))
    args = build_parser().parse_args(["serve"])
    assert _served_names(args) == (DEMO_SERVED_NAME, path)
    assert engine_config_from_args(args).model.model == path


def _one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    """`expected`: a regular expression for the one line on stderr."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(expected, lines[0]), proc.stderr[-2000:]
    assert "serving" not in proc.stdout


@pytest.mark.parametrize("model", ["/no/such/checkpoint", "no/such", "missing.gguf"])
def test_wrong_model_path_is_one_line(model: str) -> None:
    proc = subprocess.run(CLI + ["serve", model, "--port", str(free_port())], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    suffix = r" \(nor a Hub model: \w+\)" if model == "no/such" else ""  # shaped like a Hub id: looked up, offline
    _one_line_error(proc, f"pensieve serve: error: no such file or directory: {re.escape(model)}{suffix}")


def test_wrong_model_path_in_chat_and_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from pensieve.cli import main

    assert main(["chat", "--model", "/no/such/checkpoint"]) == 2
    assert capsys.readouterr().err == "pensieve chat: error: no such file or directory: /no/such/checkpoint\n"
    assert main(["bench", "--model", "/no/such/checkpoint", "--systems", "tiered"]) == 2
    assert capsys.readouterr().err == "pensieve bench: no such file or directory: /no/such/checkpoint\n"


def test_port_in_use_fails_before_loading(tiny_model: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run(CLI + ["serve", tiny_model, *SMALL_ENGINE, "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
    _one_line_error(proc, f"pensieve serve: error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "loading" not in proc.stderr and time.monotonic() - start < 60


def test_chat_ctrl_c_at_the_prompt_quits(tiny_model: str, tmp_path) -> None:
    # stderr to a file, not a pipe nobody reads while the chat runs (a full pipe would block it); if it
    # does not exit, SIGABRT makes faulthandler write every thread's stack there for the failure message
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        # Ctrl-C as a terminal sends it: a test run started in the background (`cmd &` without job control)
        # hands its children SIGINT ignored, which a chat rightly keeps ignoring
        proc = subprocess.Popen(CLI + ["chat", tiny_model, *SMALL_ENGINE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                env=dict(os.environ, PYTHONFAULTHANDLER="1"),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = ""
        while "you> " not in seen:  # the engine is up and the prompt waits on stdin (left open)
            char = proc.stdout.read(1)
            assert char, err_path.read_text()
            seen += char
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            raise AssertionError("the chat did not exit on Ctrl-C:\n" + err_path.read_text()[-6000:]) from None
        assert code == 130, err_path.read_text()
        assert "Traceback" not in err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_an_unusable_kv_cache_in_one_line(tmp_path, tiny_model: str) -> None:
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
        proc = subprocess.run(CLI + ["serve", tiny_model, *SMALL_ENGINE, "--port", str(free_port()), "--log-level", "warning",
                                     *flags], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PENSIEVE_API_KEY": ""})
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("pensieve serve: error:")]
        assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
