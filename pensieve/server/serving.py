"""Running the app under uvicorn with a graceful shutdown.

On SIGINT/SIGTERM uvicorn stops accepting connections and waits for the requests in flight. Before
that wait, the app's drain starts (runtime.Drain): new requests on open connections get 503, those
in flight may finish within `shutdown_timeout_s`, then each one left is cut: a stream ends with an
OpenAI error event and `[DONE]` (Responses: an `error` event), a non-streaming request gets a 503.
Uvicorn's own timeout is set past the grace, so it never cancels a request mid-response; only then
does the lifespan stop the engine (and save the cache).
"""
from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from pensieve.server.runtime import ServerState

# time for cut requests to send their last event after the grace: an abort waits for the engine's
# current step at most
CUT_MARGIN_S = 10.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._state.drain.begin(self._state.settings.shutdown_timeout_s, self._state.in_flight)
        await super().shutdown(sockets)


def server_for(app: FastAPI, host: str, port: int, log_level: str = "info") -> GracefulServer:
    state: ServerState = app.state.pensieve
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=state.settings.shutdown_timeout_s + CUT_MARGIN_S)
    return GracefulServer(config, state)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info",
          sockets: list[socket.socket] | None = None) -> None:
    """Serves until SIGINT/SIGTERM, then shuts down as the module says. As `uvicorn.run` does, the
    signal is raised again once shut down: SIGTERM ends the process with its usual status. `sockets`:
    already bound (the CLI binds before the model loads, so a port in use fails at once)."""
    try:
        server_for(app, host, port, log_level).run(sockets=sockets)
    except KeyboardInterrupt:
        pass
