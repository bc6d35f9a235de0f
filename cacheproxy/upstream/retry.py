"""A bounded number of repeated attempts with exponential backoff and jitter."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

MAX_DELAY = 30.0


class RetryBudget:
    """``retries`` extra attempts shared by everything one fetch does (headers, resumes)."""

    def __init__(self, retries: int, backoff: float, on_retry: Callable[[], None] | None = None) -> None:
        self.left = retries
        self.used = 0
        self._backoff = backoff
        self._on_retry = on_retry

    def delay(self) -> float:
        base = min(MAX_DELAY, self._backoff * (2**self.used))
        return base * random.uniform(0.5, 1.5)

    async def spend(self) -> bool:
        """Wait before the next attempt; False when none is left."""
        if self.left <= 0:
            return False
        delay = self.delay()
        self.left -= 1
        self.used += 1
        if self._on_retry is not None:
            self._on_retry()
        if delay > 0:
            await asyncio.sleep(delay)
        return True
