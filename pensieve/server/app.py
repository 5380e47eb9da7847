"""The FastAPI app factory: routes, error handlers, metrics and the engine's lifespan."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pensieve import __version__
from pensieve.engine.client import EngineClient
from pensieve.server import openai_api, responses_api, routing_api
from pensieve.server.conversations import ConversationRegistry, ResponseStore
from pensieve.server.errors import APIError, install_error_handlers
from pensieve.server.limits import AdmissionControl, BodySizeLimit
from pensieve.server.metrics import GatewayCollector, MetricsMiddleware, ServerMetrics
from pensieve.server.runtime import ServerState, authenticate, get_state
from pensieve.server.settings import ServerSettings


def build_app(engine: EngineClient, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `engine` (AsyncEngine or EngineProcess). The app owns it: its shutdown runs at
    the app's end."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine.stats)
    cache_config = getattr(getattr(engine, "config", None), "cache", None)
    metrics.registry.register(GatewayCollector(engine.stats, getattr(cache_config, "block_size", None)))
    state = ServerState(
        engine=engine, settings=settings, metrics=metrics,
        responses=ResponseStore(settings.max_stored_responses),
        conversations=ConversationRegistry(settings.conversation_ttl),
        model_names=settings.served_model_names or (str(engine.model_name),),
    )
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.kv_events_endpoint:
            from pensieve.server.kv_events import KVEventPublisher

            state.kv_events = KVEventPublisher(settings.kv_events_endpoint, engine.config.cache.block_size,
                                               engine.cached_block_keys)
            state.kv_events.start()
        yield
        if state.kv_events is not None:
            await state.kv_events.close()
        # Uvicorn has stopped accepting and the drain (serving.py) has ended what outlived the
        # grace; abort any request still registered so the engine frees its blocks, then stop the
        # engine (which saves the cache with --kv-cache-path).
        for request_id in list(state.in_flight):
            await engine.abort(request_id)
        await engine.shutdown()

    app = FastAPI(title="Pensieve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server with conversation KV caching across turns.")
    app.state.pensieve = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(AdmissionControl, state=state)
    app.add_middleware(MetricsMiddleware, metrics=metrics)   # outermost: counts the 413s too
    if settings.replica_name:   # every answer, 413s included, names its replica
        app.add_middleware(routing_api.ReplicaHeader, name=settings.replica_name)
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(routing_api.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        # 503 once the engine has stopped (its thread or process died): a supervisor restarts the server
        if not getattr(engine, "alive", True):
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> JSONResponse:
        # as vLLM answers it (its multi-turn benchmark client asks before it starts)
        return JSONResponse({"version": __version__})

    @app.get("/v1/models", dependencies=[Depends(authenticate)])
    async def models(request: Request) -> JSONResponse:
        st = get_state(request)
        data = [{"id": name, "object": "model", "created": started, "owned_by": "pensieve",
                 "root": str(st.engine.model_name), "max_model_len": st.engine.max_model_len}
                for name in st.model_names]
        return JSONResponse({"object": "list", "data": data})

    # Engine-wide counters and gauges (docs/SECURITY.md): open by default, like vLLM's, for scrapers
    # on a private network; --metrics-require-auth asks for an API key
    metrics_auth = [Depends(authenticate)] if settings.metrics_require_auth else []

    @app.get("/metrics", include_in_schema=False, dependencies=metrics_auth)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if settings.enable_cache_reset:
        # vLLM's name for it: a benchmark's client runs, the cache is emptied, the next client starts cold
        # on a warm server (no second model load and kernel compile)
        @app.post("/reset_prefix_cache", dependencies=[Depends(authenticate)])
        async def reset_prefix_cache(request: Request) -> JSONResponse:
            st = get_state(request)
            busy = APIError(409, "Requests are in flight: reset the cache when the server is idle",
                            code="server_busy")
            if st.in_flight:
                raise busy
            st.conversations.clear()
            if not await asyncio.to_thread(st.engine.reset_cache):   # waits for the engine thread
                raise busy
            return JSONResponse({"reset": True})

    return app
