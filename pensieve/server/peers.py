"""Replicas that hand a stateful request to the replica holding its state.

A `previous_response_id` turn carries only its new input: a router cannot match it to the replica that
stored the chain (vllm-router routes such a turn by load), and no router reads the id. So a replica names
itself in the ids it mints (`resp_<random>.<replica>`), and a replica that receives a turn continuing a
response stored elsewhere forwards it, once, to that replica, which answers with the chain's KV in its
cache. When that replica is gone the turn fails with 404 `response_not_found`: the chain's state died with
it, and the client continues by resending the history (docs/REPLICAS.md).

Deleting a named conversation reaches every replica: its KV may be cached on several.
"""
from __future__ import annotations

import logging
import secrets
import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from pensieve.server.errors import APIError
from pensieve.server.settings import ServerSettings

log = logging.getLogger(__name__)

FORWARDED = "x-pensieve-forwarded-by"   # set on a forwarded request: it is answered where it lands, never forwarded again
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                "proxy-authorization", "proxy-authenticate", "trailer"}


def new_response_id(settings: ServerSettings) -> str:
    """An unguessable response id; a replica of a deployment appends its name so peers can find it."""
    rid = f"resp_{secrets.token_urlsafe(16)}"
    return f"{rid}.{settings.replica_name}" if settings.replica_name else rid


def owner_url(settings: ServerSettings, response_id: str, request: Request) -> str | None:
    """The peer that minted `response_id`, if it is another replica and this request was not forwarded already."""
    if request.headers.get(FORWARDED) or "." not in response_id:
        return None
    owner = response_id.rsplit(".", 1)[1]
    if owner == settings.replica_name:
        return None
    return dict(settings.replica_peers).get(owner)


def _headers(request: Request, settings: ServerSettings) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    headers[FORWARDED] = settings.replica_name or "replica"
    return headers


async def from_owner(request: Request, settings: ServerSettings, response_id: str, not_found: APIError) -> Response:
    """The answer of the replica that stored `response_id` to this request; raises `not_found` when that is
    this replica or no peer, and a 404 that says so when that replica does not answer (its state died with it)."""
    peer = owner_url(settings, response_id, request)
    if peer is None:
        raise not_found
    gone = APIError(404, f"{not_found.message}: it was stored by replica {response_id.rsplit('.', 1)[1]}, "
                         "which does not answer; resend the conversation's history to continue",
                    param=not_found.param, code=not_found.code)
    return await forward(request, settings, peer, gone)


async def forward(request: Request, settings: ServerSettings, peer: str, not_found: Exception) -> Response:
    """Sends this request to `peer` and streams its answer back; raises `not_found` if the peer does not answer."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
    try:
        upstream = client.build_request(request.method, peer + request.url.path, params=request.query_params,
                                        headers=_headers(request, settings), content=await request.body())
        resp = await client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        log.warning("peer %s did not answer a forwarded %s %s: %s", peer, request.method, request.url.path, exc)
        raise not_found from exc

    async def close() -> None:
        await resp.aclose()
        await client.aclose()

    headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
    return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=headers,
                             background=BackgroundTask(close))


async def broadcast(request: Request, settings: ServerSettings) -> list[int]:
    """Sends this request to every peer (not back to where it came from); their status codes (0: no answer)."""
    if request.headers.get(FORWARDED):
        return []
    codes = []
    async with httpx.AsyncClient(timeout=10.0) as client:
        for _, url in settings.replica_peers:
            try:
                r = await client.request(request.method, url + request.url.path, headers=_headers(request, settings),
                                         content=await request.body())
                codes.append(r.status_code)
            except httpx.HTTPError:
                codes.append(0)
    return codes
