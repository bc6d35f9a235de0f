"""Service endpoints for machines: liveness, readiness and metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from .metrics import Metrics

Endpoint = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Readiness = Callable[[], Awaitable[dict[str, dict[str, object]]]]


def endpoints(metrics: Metrics, readiness: Readiness) -> dict[str, Endpoint]:
    """Path -> handler of the read-only endpoints (GET/HEAD). ``readiness`` gives the checks of
    readyz, each with ``ok``: the instance is ready when all are."""

    async def healthz(request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.BaseRequest) -> web.Response:
        checks = await readiness()
        ready = all(c["ok"] for c in checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def render_metrics(request: web.BaseRequest) -> web.Response:
        body, content_type = metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return {
        "/_cacheproxy/healthz": healthz,
        "/_cacheproxy/readyz": readyz,
        "/_cacheproxy/metrics": render_metrics,
        "/metrics": render_metrics,
    }
