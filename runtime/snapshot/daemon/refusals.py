"""Refused callers, logged once each: a misconfigured or hostile peer must not flood the daemon's log."""

from __future__ import annotations

import logging
import threading

__all__ = ["RefusalLog"]

log = logging.getLogger(__name__)


class RefusalLog:
    """Counts authentication refusals per peer host; the first of each host is a warning, the rest debug lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count: dict[str, int] = {}

    def note(self, host: str, reason: str) -> None:
        with self._lock:
            first = host not in self.count
            self.count[host] = self.count.get(host, 0) + 1
        if first:
            log.warning("refused %s: %s (further refusals of this host are logged at debug level)", host, reason)
        else:
            log.debug("refused %s: %s", host, reason)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.count.values())
