"""Rehearsing a cluster on one machine: its network (:mod:`.net`), planned from a cluster file (:mod:`.plan`),
owned and cleaned up (:mod:`.owners`, :mod:`.watchdog`), and left up by ``plait cluster`` (:mod:`.cli`)."""

from plait.runtime.rehearsal.namespaces import NeedsRoot, NetworkError, require_root
from plait.runtime.rehearsal.net import NetPlan, Network, NodeLink, UplinkLink, new_tag
from plait.runtime.rehearsal.owners import list_networks, reap_stale
from plait.runtime.rehearsal.watchdog import WatchdogHandle, start_watchdog

__all__ = ["NeedsRoot", "NetPlan", "Network", "NetworkError", "NodeLink", "UplinkLink", "WatchdogHandle",
           "list_networks", "new_tag", "reap_stale", "require_root", "start_watchdog"]
