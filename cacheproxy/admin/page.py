"""The status page (``GET /_cacheproxy/``): one HTML page for people, no scripts, no external
assets (build machines are offline), readable on a phone. Charts are inline SVG drawn from the
figures :class:`~.stats.Stats` keeps for the last hour; every figure is the one the stats call
reports."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from html import escape

from aiohttp import web

from .stats import Stats

CSS = """
*{box-sizing:border-box}body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:12px;color:#1d2433;
background:#f5f6f8}h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}
.sub{color:#5b6475;margin-bottom:12px}.grid{display:grid;gap:12px;grid-template-columns:repeat(auto-fit,minmax(300px,1fr))}
.card{background:#fff;border-radius:8px;padding:12px;box-shadow:0 1px 2px #0002;min-width:0}
.big{font-size:28px;font-weight:600}.muted{color:#5b6475;font-size:13px}
table{width:100%;border-collapse:collapse;font-size:13px}td,th{text-align:left;padding:3px 4px;
border-bottom:1px solid #eceef2;vertical-align:top}td.n{text-align:right;white-space:nowrap}
.url{word-break:break-all}.bar{height:10px;background:#e4e7ec;border-radius:5px;overflow:hidden}
.bar i{display:block;height:100%;background:#2f6fde}.bad{color:#b42318}.ok{color:#067647}
svg{width:100%;height:auto;display:block}.legend span{display:inline-block;margin-right:10px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
"""
CACHE_COLOUR = "#2f6fde"
ORIGIN_COLOUR = "#f79009"


def status_page(stats: Stats) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    async def page(request: web.BaseRequest) -> web.StreamResponse:
        data = await stats.snapshot()
        return web.Response(text=render(data), content_type="text/html", headers={"Cache-Control": "no-store"})

    return page


def render(d: dict) -> str:  # type: ignore[type-arg]
    store = d["store"]
    ratio = d["hit_ratio"]
    hour = d["last_hour"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1"><link rel=icon href="data:,">',
        f"<title>cacheproxy {escape(d['instance'])}</title><style>{CSS}</style></head><body>",
        f"<h1>cacheproxy on {escape(d['instance'])}</h1>",
        f"<div class=sub>up {_duration(d['uptime_seconds'])} · figures of this process · "
        f"<a href=/_cacheproxy/api/stats>stats JSON</a> · <a href=/_cacheproxy/metrics>metrics</a></div>",
        "<div class=grid>",
        _card(
            "Hit ratio",
            f"<div class=big id=hit-ratio>{'-' if ratio is None else f'{ratio * 100:.1f} %'}</div>"
            f"<div class=muted>since start; requests per minute, last hour:</div>"
            + _chart(hour, "hits", "misses", "from the cache", "from the origin", _count),
        ),
        _card(
            "Bytes served",
            f"<div><span class=big id=bytes-cache>{_size(d['bytes']['cache'])}</span> from the cache · "
            f"<span id=bytes-upstream>{_size(d['bytes']['upstream'])}</span> from origins</div>"
            f"<div class=muted>per minute, last hour:</div>"
            + _chart(hour, "cache_bytes", "upstream_bytes", "from the cache", "from origins", _size),
        ),
        _card("Store", _store(store)),
        _card("Fills in progress", _fills(d["fills"])),
        _card("OBS", _obs(d["obs"])),
        _card("Recent failures", _failures(d["recent_failures"])),
        _card("Recent alerts", _alerts(d["recent_alerts"])),
        _card("Largest objects", _objects(d["largest"], "size")),
        _card("Most requested", _objects(d["most_requested"], "hits")),
        "</div></body></html>",
    ]
    return "".join(parts)


def _card(title: str, body: str) -> str:
    return f"<section class=card><h2>{escape(title)}</h2>{body}</section>"


def _store(store: dict) -> str:  # type: ignore[type-arg]
    used, limit = store["bytes"], max(store["max_size"], 1)
    share = min(used / limit, 1.0)
    high, low = store["high_watermark"], store["low_watermark"]
    colour = "bad" if share > high else "ok"
    return (
        f"<div><span class=big id=store-objects>{store['objects']}</span> objects · "
        f"<span id=store-bytes>{_size(used)}</span> of {_size(limit)} "
        f"(<span class={colour}>{share * 100:.1f} %</span>)</div>"
        f'<svg viewBox="0 0 300 22" role=img aria-label="store usage">'
        f'<rect width=300 height=14 rx=4 fill="#e4e7ec"/>'
        f'<rect width="{share * 300:.1f}" height=14 rx=4 fill="{CACHE_COLOUR}"/>'
        f'<line x1="{high * 300:.1f}" x2="{high * 300:.1f}" y1=0 y2=20 stroke="#b42318" stroke-width="2"/>'
        f'<line x1="{low * 300:.1f}" x2="{low * 300:.1f}" y1=0 y2=20 stroke="#067647" stroke-width="2"/></svg>'
        f"<div class=muted>eviction above {high * 100:.0f} % (red) down to {low * 100:.0f} % (green); "
        f"disk: {_size(store['disk_free'])} free of {_size(store['disk_total'])}; {escape(store['dir'])}</div>"
    )


def _fills(fills: list) -> str:  # type: ignore[type-arg]
    rows = []
    for f in fills:
        size = f["size"]
        share = f["written"] / size if size else None
        bar = f"<div class=bar><i style='width:{share * 100:.1f}%'></i></div>" if share is not None else ""
        of = f" of {_size(size)}" if size else ""
        rows.append(
            f"<td class=url>{escape(f['url'])}{bar}</td>"
            f"<td class=n>{_size(f['written'])}{of}<br>{f['seconds']:.0f} s</td>"
        )
    return _table("fills", rows)


def _obs(obs: dict | None) -> str:  # type: ignore[type-arg]
    if obs is None:
        return "<div class=muted>not used (storage.backend: local)</div>"
    state = (
        "<span class=ok>reachable</span>" if obs["ok"] else f"<span class=bad>{escape(str(obs.get('error')))}</span>"
    )
    return (
        f"<div>bucket {escape(str(obs['bucket']))}: {state}</div>"
        f"<div class=muted>{obs['objects']} objects listed · {obs['pending_uploads']} uploads waiting</div>"
    )


def _failures(failures: list) -> str:  # type: ignore[type-arg]
    return _table(
        "failures",
        [
            f"<td class=n>{_ago(f['time'])}</td><td class=url>{escape(f['url'])}<br>"
            f"<span class=muted>{escape(f['error'])}</span></td>"
            for f in failures
        ],
    )


def _alerts(alerts: list) -> str:  # type: ignore[type-arg]
    return _table(
        "alerts",
        [
            f"<td>{escape(a['time'])}</td><td><b>{escape(a['event'])}</b> {escape(a['subject'])}<br>"
            f"<span class=muted>{escape(a['last_error'])} · sent to: "
            f"{escape(', '.join(a['channels']) or 'no channel')}</span></td>"
            for a in alerts
        ],
    )


def _table(name: str, rows: list[str], empty: str = "none") -> str:
    if not rows:
        return f"<div class=muted id={name}>{empty}</div>"
    return f"<table id={name}>{''.join(f'<tr>{row}</tr>' for row in rows)}</table>"


def _objects(objects: list, figure: str) -> str:  # type: ignore[type-arg]
    return _table(
        figure,
        [
            f"<td class=url>{escape(o['url'])}</td><td class=n>"
            f"{_size(o['size']) if figure == 'size' else str(o['hits']) + ' hits'}</td>"
            for o in objects
        ],
        "none yet",
    )


def _chart(points: list, first: str, second: str, first_name: str, second_name: str, fmt: object) -> str:  # type: ignore[type-arg]
    """Two stacked bar series, one bar per minute of the last hour."""
    width, height, slots = 300, 80, 60
    top = max([p[first] + p[second] for p in points] + [1])
    bar = width / slots
    shapes = []
    for i, p in enumerate(points[-slots:]):
        x = width - (len(points[-slots:]) - i) * bar
        h1 = p[first] / top * (height - 2)
        h2 = p[second] / top * (height - 2)
        for y, h, colour in ((height - h1, h1, CACHE_COLOUR), (height - h1 - h2, h2, ORIGIN_COLOUR)):
            shapes.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="{colour}"/>')
    label = fmt(top)  # type: ignore[operator]
    return (
        f'<svg viewBox="0 0 {width} {height + 12}" role=img '
        f'aria-label="{escape(first_name)} and {escape(second_name)}">'
        f'<line x1=0 x2={width} y1={height} y2={height} stroke="#c9ced6"/>{"".join(shapes)}'
        f'<text x=0 y=10 font-size=9 fill="#5b6475">max {escape(str(label))}</text>'
        f'<text x=0 y={height + 11} font-size=9 fill="#5b6475">-60 min</text>'
        f'<text x={width} y={height + 11} font-size=9 fill="#5b6475" text-anchor=end>now</text></svg>'
        f"<div class='legend muted'><span><i class=sw style='background:{CACHE_COLOUR}'></i>{escape(first_name)}</span>"
        f"<span><i class=sw style='background:{ORIGIN_COLOUR}'></i>{escape(second_name)}</span></div>"
    )


def _count(n: float) -> str:
    return f"{n:.0f}"


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"{days}d {h}h" if days else f"{h}h {m}m" if hours else f"{m}m {s}s"


def _ago(when: float) -> str:
    return _duration(max(time.time() - when, 0)) + " ago"
