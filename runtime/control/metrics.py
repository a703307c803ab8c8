"""Every rank's metrics in one place: the coordinator's ``/metrics``, read from the workers' reports.

Rank 0's exporter (:mod:`plait.runtime.metrics`) has the job's numbers (loss, throughput,
MFU); this one has each rank's, aggregated by the coordinator from the heartbeats, so
a slow or stuck rank is visible without scraping every worker:

=====================================  =======================================================
``plait_rank_step``                    last finished step, per rank (labels job, rank, node)
``plait_rank_step_seconds``            the rank's last step: wall time ...
``plait_rank_compute_seconds``         ... the part outside collectives ...
``plait_rank_comm_seconds``            ... and the part blocked in collectives
``plait_rank_in_collective_seconds``   for how long the rank has been in the collective it is in now
``plait_rank_report_age_seconds``      seconds since the rank's last report
``plait_straggler``                    1 for each rank the straggler test names (labels + cause)
``plait_straggler_excess_seconds``     its median excess over the median rank, per step
``plait_ranks_registered``             workers registered in the current attempt's view
``plait_attempt``                      the job's attempt (restarts so far)
``plait_hangs``                        hangs found (counter: ``plait_hangs_total``)
``plait_control_refused``              requests refused (counter: ``plait_control_refused_total``)
=====================================  =======================================================

Values are computed when scraped (a collector over :class:`~.state.JobState`), so they
are never staler than the last report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from plait.runtime.control.state import JobState

__all__ = ["CoordinatorMetrics"]

RANK_GAUGES = (
    ("plait_rank_step", "Last finished step of the rank", "step"),
    ("plait_rank_step_seconds", "Wall time of the rank's last step", "step_s"),
    ("plait_rank_compute_seconds", "The rank's last step outside collectives", "compute_s"),
    ("plait_rank_comm_seconds", "The rank's last step blocked in collectives", "comm_s"),
    ("plait_rank_in_collective_seconds", "How long the rank has been in its current collective", "in_collective_s"),
    ("plait_rank_report_age_seconds", "Seconds since the rank's last report to the coordinator", "seen_s_ago"),
)


class _StateCollector:
    def __init__(self, state: JobState, hangs: Callable[[], int]):
        self.state = state
        self.hangs = hangs

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self.state.status()
        job = status["job"]
        for name, doc, key in RANK_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["job", "rank", "node"])
            for r in status["ranks"]:
                family.add_metric([job, str(r["rank"]), str(r["node"])], float(r[key]))
            yield family
        named = GaugeMetricFamily("plait_straggler", "1 for each rank named a straggler",
                                  labels=["job", "rank", "node", "cause"])
        excess = GaugeMetricFamily("plait_straggler_excess_seconds", "A straggler's median excess per step",
                                   labels=["job", "rank", "node", "cause"])
        for s in status["stragglers"]:
            labels = [job, str(s["rank"]), str(s["node"]), s["cause"]]
            named.add_metric(labels, 1.0)
            excess.add_metric(labels, float(s["excess_s"]))
        yield named
        yield excess
        yield _one("plait_ranks_registered", "Workers registered with the coordinator", job, status["registered"])
        yield _one("plait_attempt", "The job's attempt: elastic restarts so far", job, status["attempt"])
        hangs = CounterMetricFamily("plait_hangs", "Hangs the coordinator found", labels=["job"])
        hangs.add_metric([job], float(self.hangs()))
        yield hangs
        refused = CounterMetricFamily("plait_control_refused", "Requests the coordinator refused", labels=["job"])
        refused.add_metric([job], float(status["refused_requests"]))
        yield refused


def _one(name: str, doc: str, job: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["job"])
    family.add_metric([job], float(value))
    return family


class CoordinatorMetrics:
    """The registry the coordinator serves (the interface :class:`plait.runtime.metrics.MetricsServer` needs)."""

    def __init__(self, state: JobState, hangs: Callable[[], int] = lambda: 0):
        self.state = state
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state, hangs))

    def health(self) -> dict[str, object]:
        status = self.state.status()
        return {"role": "coordinator", "job": status["job"], "registered": status["registered"],
                "world": status["world"], "step": status["step"], "attempt": status["attempt"]}
