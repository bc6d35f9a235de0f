"""Service endpoints for machines: liveness, readiness and metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from ..state import AppState

Endpoint = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def endpoints(state: AppState) -> dict[str, Endpoint]:
    """Path -> handler of the read-only endpoints (GET/HEAD)."""

    async def healthz(request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.BaseRequest) -> web.Response:
        checks: dict[str, dict[str, object]] = {}
        problem = await state.store.check_writable()
        checks["store_writable"] = {"ok": problem is None, **({"error": problem} if problem else {})}
        loaded = state.cache.index.loaded
        checks["index_loaded"] = {"ok": loaded, "objects": len(state.cache.index)}
        if state.shared is not None:
            shared = state.shared
            problem = shared.problem
            checks["obs"] = {
                "ok": problem is None,
                "bucket": shared.remote.bucket,
                "objects": len(shared.entries),
                "pending_uploads": len(shared.pending),
                **({"error": problem} if problem else {}),
            }
        ready = all(c["ok"] for c in checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics(request: web.BaseRequest) -> web.Response:
        body, content_type = state.metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return {
        "/_cacheproxy/healthz": healthz,
        "/_cacheproxy/readyz": readyz,
        "/_cacheproxy/metrics": metrics,
        "/metrics": metrics,
    }
