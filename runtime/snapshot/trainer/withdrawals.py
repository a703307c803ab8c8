"""Snapshot versions another rank gave up before writing them, told to rank 0 through the job's store.

A version is published once every node's daemon holds it complete, so a version that one
rank never wrote can never be published. Rank 0 gives up its own such versions at once
(:meth:`VersionLifecycle.withdraw`); any other rank's skip used to be seen only at the
version's deadline (``snapshot.complete_timeout``), and the job's end waited for it. Now the
rank that skips writes one key into the store the process group was built on (the c10d
store every rank already reaches): ``plait/snapshot/withdrawn/<version>`` holding a line of
text that says why. Rank 0's lifecycle thread looks for the keys of the versions it waits on
at each poll and withdraws those it finds. Nothing waits on the store: a rank that cannot
write the key (the store gone) logs it, and the deadline decides as before.

The value is plain text, length-bounded and never unpickled; what can write it is what can
already write the process group's own keys (the job's trust domain): at worst it makes rank 0
give a version up early, and the previous published version stays the restore point.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

log = logging.getLogger("plait.snapshot.withdrawals")

PREFIX = "plait/snapshot/withdrawn/"
MAX_REASON = 300  # characters of the reason kept


def _key(version: int) -> str:
    return f"{PREFIX}{int(version)}"


class Withdrawals:
    """The store's side channel for withdrawn versions; ``store`` None: nothing is told (single process, tests)."""

    def __init__(self, store: Any | None):
        self.store = store

    def tell(self, version: int, rank: int, why: str) -> bool:
        """Any rank: version ``version`` can never complete, because rank ``rank`` never wrote it (``why``)."""
        if self.store is None:
            return False
        text = f"rank {rank} skipped it: {why}"[:MAX_REASON]
        try:
            self.store.set(_key(version), text)
        except Exception as err:  # noqa: BLE001 - a snapshot must never stop training: the deadline decides
            log.warning("could not tell rank 0 that snapshot version %d was skipped (%s: %s); it will wait for its "
                        "deadline", version, type(err).__name__, err)
            return False
        return True

    def told(self, versions: Iterable[int]) -> dict[int, str]:
        """Rank 0: of ``versions``, those some rank withdrew, with the reason it gave."""
        if self.store is None:
            return {}
        out = {}
        for version in versions:
            key = _key(version)
            try:
                if not self.store.check([key]):
                    continue
                raw = self.store.get(key)
            except Exception as err:  # noqa: BLE001 - the store away: nothing told, the deadline decides
                log.debug("withdrawals: store unreachable (%s: %s)", type(err).__name__, err)
                return out
            text = bytes(raw[:MAX_REASON]).decode("utf-8", errors="replace")
            out[version] = "".join(ch if ch.isprintable() else "?" for ch in text)  # it goes into a log line
        return out
