"""Prefetch jobs (``POST /_cacheproxy/api/prefetch``): URLs made sure to be cached, a few at a time.

A job runs in the process that took the POST, through the cache's normal fill (a client asking
for the same URL meanwhile shares the fetch). Its state is written to ``jobs/<id>.json`` in the
store's folder at every change, so any worker of the instance can answer ``GET …/prefetch/ID``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path

from yarl import URL

from ..cache.manager import Cache
from ..errors import ProxyError

log = logging.getLogger(__name__)

CONCURRENCY = 4  # URLs of all jobs fetched at once by this process
KEEP = 86400.0  # seconds a finished job stays readable
MAX_URLS = 10_000  # URLs in one job


class Jobs:
    def __init__(self, cache: Cache, folder: Path) -> None:
        self.cache = cache
        self.folder = folder
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self, urls: list[tuple[str, URL]]) -> dict[str, object]:
        """Queue a job for ``urls`` (each as given, and parsed); return its first state."""
        job: dict[str, object] = {
            "id": secrets.token_hex(8),
            "state": "queued",
            "created": time.time(),
            "urls": [{"url": given, "state": "pending", "error": None} for given, _ in urls],
        }
        await self._save(job)
        run = self._run(job, [url for _, url in urls])
        self._tasks.add(task := asyncio.create_task(run, name=f"prefetch {job['id']}"))
        task.add_done_callback(self._tasks.discard)
        return job

    async def get(self, job_id: str) -> dict[str, object] | None:
        if not job_id.isalnum() or len(job_id) > 32:
            return None
        try:
            text = await asyncio.to_thread((self.folder / f"{job_id}.json").read_bytes)
        except OSError:
            return None
        job: dict[str, object] = json.loads(text)
        return job

    async def _run(self, job: dict[str, object], urls: list[URL]) -> None:
        entries: list[dict[str, object]] = job["urls"]  # type: ignore[assignment]
        job["state"] = "running"
        await self._save(job)
        await asyncio.gather(*(self._one(job, entry, url) for entry, url in zip(entries, urls, strict=True)))
        job["state"] = "done"
        job["finished"] = time.time()
        await self._save(job)
        states = [e["state"] for e in entries]
        log.info(
            "prefetch job %s done: %d cached, %d already cached, %d failed",
            job["id"],
            states.count("cached"),
            states.count("already_cached"),
            states.count("failed"),
        )

    async def _one(self, job: dict[str, object], entry: dict[str, object], url: URL) -> None:
        async with self._slots:
            entry["state"] = "fetching"
            await self._save(job)
            try:
                entry["state"], entry["error"] = await self.cache.prefetch(url)
            except ProxyError as exc:
                entry["state"], entry["error"] = "failed", f"{exc.code}: {exc.reason}"
            except Exception as exc:  # one URL's bug must not leave the job running forever
                log.exception("prefetch of %s failed", url)
                entry["state"], entry["error"] = "failed", f"internal error: {type(exc).__name__}"
            await self._save(job)

    async def _save(self, job: dict[str, object]) -> None:
        """Write the job's state as it is now; writes of one job happen in order."""
        data = json.dumps(job)
        lock = self._locks.setdefault(str(job["id"]), asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self._write, str(job["id"]), data)
        if job["state"] == "done":
            self._locks.pop(str(job["id"]), None)

    def _write(self, job_id: str, data: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{job_id}.json"
        part = path.with_suffix(f".{os.getpid()}.part")
        part.write_text(data)
        part.replace(path)  # readers never see half a file

    def prune(self) -> None:
        now = time.time()
        for path in self.folder.glob("*.json"):
            try:
                if now - path.stat().st_mtime > KEEP:
                    path.unlink()
            except OSError:
                pass

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
