"""`pensieve chat`: a terminal chat against an in-process engine or a running server (--url).

Each turn prints the streamed reply, then how many prompt tokens came from the KV cache and the time to
the first token. In-process turns append token ids (the cache holds the whole history); against a
server the history is resent and the server's prefix matching finds it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, str]


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None


class ChatBackend(Protocol):
    name: str

    def turn(self, messages: list[Message], stats: TurnStats) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...


class LocalBackend:
    """In-process AsyncEngine; each turn's prompt is the previous turn's ids plus the new turn's."""

    def __init__(self, args: argparse.Namespace) -> None:
        from pensieve.cli import engine_config_from_args
        from pensieve.engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(engine_config_from_args(args))
        self.name = f"{self.engine.model_name} (in-process, {self.engine.device})"
        self._max_tokens, self._temperature = args.max_tokens, args.temperature
        self._history: list[Message] = []       # messages whose ids are in _ids
        self._ids: list[int] = []
        self._reply_start = 0
        self._turn = 0

    async def turn(self, messages: list[Message], stats: TurnStats) -> AsyncIterator[str]:
        from pensieve.sampling_params import SamplingParams
        from pensieve.server.prompts import append_turn_ids, chat_prompt_ids

        tok = self.engine.tokenizer
        new = messages[len(self._history):]
        if self._history:
            prompt = append_turn_ids(tok, self._history, self._ids, self._ids[self._reply_start:], new)
        else:
            prompt = chat_prompt_ids(tok, messages)
        room = self.engine.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context "
                             f"({self.engine.max_model_len}); start a new chat")
        params = SamplingParams(max_tokens=min(self._max_tokens, room), temperature=self._temperature)
        self._turn += 1
        start, final = time.perf_counter(), None
        reply: list[str] = []
        reply_ids: list[int] = []
        # each output carries only the new text and ids (a stream)
        async for out in self.engine.generate(f"chat-{self._turn}", prompt, params, conversation_id="chat"):
            comp, final = out.outputs[0], out
            if stats.ttft_s is None and comp.token_ids:
                stats.ttft_s = time.perf_counter() - start
            reply_ids += comp.token_ids
            if comp.text:
                reply.append(comp.text)
                yield comp.text
        if final is not None:
            stats.prompt_tokens, stats.cached_tokens = len(final.prompt_token_ids), final.cache.cached_tokens
            self._history = messages + [{"role": "assistant", "content": "".join(reply)}]
            self._ids = list(final.prompt_token_ids) + reply_ids
            self._reply_start = len(final.prompt_token_ids)

    async def close(self) -> None:
        await self.engine.shutdown()


class RemoteBackend:
    """A running Pensieve (or any OpenAI-compatible) server through the openai client."""

    def __init__(self, args: argparse.Namespace) -> None:
        from openai import AsyncOpenAI

        key = args.api_key or os.environ.get("PENSIEVE_API_KEY") or "EMPTY"
        self.client = AsyncOpenAI(base_url=args.url, api_key=key)
        self.model: str | None = args.served_model_name
        self.name = args.url
        self._max_tokens, self._temperature = args.max_tokens, args.temperature

    async def turn(self, messages: list[Message], stats: TurnStats) -> AsyncIterator[str]:
        if self.model is None:
            self.model = (await self.client.models.list()).data[0].id
        start = time.perf_counter()
        stream: Any = await self.client.chat.completions.create(
            model=self.model, messages=messages, stream=True, stream_options={"include_usage": True},
            max_tokens=self._max_tokens, temperature=self._temperature)
        async for chunk in stream:
            if chunk.usage is not None:
                stats.prompt_tokens = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                stats.cached_tokens = (details.cached_tokens or 0) if details else 0
            for choice in chunk.choices:
                if choice.delta.content:
                    if stats.ttft_s is None:
                        stats.ttft_s = time.perf_counter() - start
                    yield choice.delta.content

    async def close(self) -> None:
        await self.client.close()


async def _read_line() -> str:
    """One line of stdin, read on a daemon thread: a Ctrl-C at the prompt ends the chat at once (a thread of
    the loop's default executor, blocked in readline, would keep asyncio.run from returning)."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        text = sys.stdin.readline()
        loop.call_soon_threadsafe(lambda: line.done() or line.set_result(text))

    threading.Thread(target=read, name="chat-stdin", daemon=True).start()
    return await line


async def chat_loop(backend: ChatBackend, system: str | None, out: Any = sys.stdout) -> int:
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    print(f"Chatting with {backend.name}. /exit or Ctrl-D quits.", file=out, flush=True)
    try:
        while True:
            print("you> ", end="", file=out, flush=True)
            line = await _read_line()
            if not line:  # EOF
                print(file=out)
                break
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if not text:
                continue
            messages.append({"role": "user", "content": text})
            stats, reply = TurnStats(), []
            print("assistant> ", end="", file=out, flush=True)
            try:
                async for delta in backend.turn(messages, stats):
                    reply.append(delta)
                    print(delta, end="", file=out, flush=True)
            except Exception as exc:  # a failed turn (server error, context full) should not end the chat
                print(f"\n[error: {exc}]", file=out, flush=True)
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": "".join(reply)})
            ttft = f"{stats.ttft_s * 1000:.0f} ms" if stats.ttft_s is not None else "n/a"
            print(f"\n[cached {stats.cached_tokens}/{stats.prompt_tokens} prompt tokens | TTFT {ttft}]",
                  file=out, flush=True)
    finally:
        await backend.close()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    async def main() -> int:
        # The engine is built inside the loop so its async parts bind to this loop.
        backend: ChatBackend = RemoteBackend(args) if args.url else LocalBackend(args)
        return await chat_loop(backend, args.system)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
