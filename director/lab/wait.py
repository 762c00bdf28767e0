"""Polling with a deadline, for tests and lab tools that wait on real processes and kernels."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float = 5.0, what: str = "", interval: float = 0.05) -> T:
    """``pred()``'s first truthy value, polled every ``interval`` s; AssertionError naming
    ``what`` when ``timeout`` s pass without one (``pred`` is always called once more at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
