"""Deterministic fault injection for tests and rehearsals: ``plait train --fault KIND:key=value:...``.

===========================================  ==============================================================
``kill-worker:rank=R:step=S``                SIGKILL worker rank R
``kill-node:node=N:step=S``                  SIGKILL node N's workers and its snapshot daemon and delete
                                             the node's shared memory; ``plait train`` starts a fresh,
                                             empty daemon in its place (a replaced machine)
``kill-daemon:node=N:step=S``                SIGKILL node N's daemon only; a fresh daemon re-adopts the
                                             shards left in shared memory; training goes on
``corrupt-shard:node=N:step=S``              flip bytes of node N's newest complete data shard (local rank
                                             0), then SIGKILL that worker: the restore must notice the bad
                                             checksum and rebuild the shard
``corrupt-parity:node=N:step=S``             flip bytes of a parity piece node N holds for its newest
                                             complete version, then kill-node the node that piece protects:
                                             the rebuild must rule the piece out
``hang-daemon:node=N:step=S[:seconds=D]``    SIGSTOP node N's daemon, SIGCONT after D seconds (default 2):
                                             training goes on, snapshots are skipped, then resume
``KIND:...:restore=N``                       (kill-worker, kill-node, kill-daemon) fire inside the restore
                                             of the N-th restart instead of after a step
===========================================  ==============================================================

``plait train`` carries every fault out and verifies it (:mod:`.executor`); workers only
ask for the faults due at their point and wait (:mod:`.hook`). Each fault fires once per
run, also across restarts, and faults of one point fire in the order given.
"""

from plait.runtime.faults.hook import FaultHook, FaultNotCarriedOut
from plait.runtime.faults.records import fault_records, fired_faults
from plait.runtime.faults.spec import KINDS, Fault, check_faults, lost_at_once, parse_fault, random_faults

__all__ = ["KINDS", "Fault", "FaultHook", "FaultNotCarriedOut", "check_faults", "fault_records", "fired_faults",
           "lost_at_once", "parse_fault", "random_faults"]
