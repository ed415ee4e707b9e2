"""Fault injection for the sandbox, reproducible from the configured seed."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable
from enum import Enum

from .config import SandboxConfig


class RequestFault(Enum):
    """What a request that reached the fault stage is answered with."""

    NONE = "none"
    UNAVAILABLE = "unavailable"  # 503 before storing
    ERROR_AFTER_STORE = "error_after_store"  # 500 after storing
    GARBLE = "garble"  # 200 with an HTML page after storing


class FaultPlan:
    """Draws the request-level faults from one seeded generator and rejects messages by hash.

    Requests draw in arrival order, so one client sending the same requests one after
    another meets the same faults every time. Rejection depends only on the seed and the
    sourceUuid, so a re-sent message is rejected again.
    """

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()

    def next_request_fault(self) -> RequestFault:
        config = self._config
        if not (config.fail_rate or config.error_after_store_rate or config.garble_rate):
            return RequestFault.NONE
        with self._lock:
            draw = self._random.random()
        # The three faults take consecutive slices of [0, 1): each rate is its exact share.
        for fault, rate in (
            (RequestFault.UNAVAILABLE, config.fail_rate),
            (RequestFault.ERROR_AFTER_STORE, config.error_after_store_rate),
            (RequestFault.GARBLE, config.garble_rate),
        ):
            if draw < rate:
                return fault
            draw -= rate
        return RequestFault.NONE

    @property
    def rejecter(self) -> Callable[[str], bool] | None:
        """`rejects` while a reject rate is set; else None, and no message is looked at."""
        return self.rejects if self._config.reject_rate > 0.0 else None

    def rejects(self, source_uuid: str) -> bool:
        rate = self._config.reject_rate
        if rate <= 0.0:
            return False
        digest = hashlib.sha256(f"{self._config.seed}\0{source_uuid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < rate
