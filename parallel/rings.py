"""Reduce-scatter and all-gather over gloo as rings of point-to-point transfers.

gloo's own ``reduce_scatter_tensor`` is slower than its all-reduce on CPU tensors. ``plait bench rings``
(``bench/results/rings.json``: loopback, one thread per process, 1 to 32 MB of fp32, 2 and 4 processes)
measured the ring here at 0.16–0.69× the time of gloo's reduce-scatter and 0.29–0.78× that of its
all-reduce; at 7.6 MB (the demo model's gradient), 4 processes: 13.4 ms against 27.6 and 20.8. The ring
all-gather took 0.67–1.42× the time of gloo's (slower only at 1 MB on 4 processes).

A ring over g ranks takes g − 1 steps; in each, every rank sends one ``1/g`` chunk to the next rank and
receives one from the previous (each rank sends ``(g−1)/g`` of the buffer, the least any reduce-scatter or
all-gather can). In the reduce-scatter each received running sum gets this rank's own chunk added before
it moves on, so rank ``r`` ends with chunk ``r`` summed in the fixed order ``((x_{r+1} + x_{r+2}) + …) + x_r``
(group ranks, wrapping): the same bits on every run.

The blocking forms run on the calling thread. :func:`reduce_scatter_start` runs the ring on a thread of
the group's own (one per process group, jobs in the order they were started), so a bucket's reduction
proceeds while the backward pass goes on; its handle's ``wait()`` returns when the result is in place and
raises what the ring raised (a peer's timeout, say). Every rank of a group starts its jobs in the same
order, as for any collective. The two kinds use different tag ranges, so a blocking ring may run while a
started one is in flight on the same group.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["reduce_scatter", "all_gather", "all_reduce", "reduce_scatter_start", "all_reduce_start", "RingWork", "usable"]

# Tags far above the small ones plait's other point-to-point traffic uses (pipeline sends, tp rings), and
# far above gloo's own collective counter for any run that could fit in a lifetime.
_TAG_INLINE = 1 << 28
_TAG_LANE = (1 << 28) + (1 << 20)


def usable(pg, *tensors: torch.Tensor) -> bool:
    """Whether these rings serve this process group and these tensors: gloo, CPU, contiguous."""
    return (pg is not None and dist.get_backend(pg) == "gloo"
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def _neighbours(ranks: tuple[int, ...], rank: int) -> tuple[int, int]:
    g = len(ranks)
    return ranks[(rank + 1) % g], ranks[(rank - 1) % g]


def _exchange(send: torch.Tensor, recv: torch.Tensor, nxt: int, prv: int, pg, tag: int) -> None:
    works = [dist.isend(send, dst=nxt, group=pg, tag=tag), dist.irecv(recv, src=prv, group=pg, tag=tag)]
    for work in works:
        work.wait()


def reduce_scatter(out: torch.Tensor, t: torch.Tensor, ranks: tuple[int, ...], rank: int, pg,
                   tag: int = _TAG_INLINE) -> torch.Tensor:
    """``out`` = this rank's chunk of the sum over the group of ``t`` (contiguous; ``g`` chunks along dim 0,
    each the shape of ``out``). ``ranks``: the group's global ranks; ``rank``: this process's index in them."""
    g = len(ranks)
    chunks = t.view(g, *out.shape)
    nxt, prv = _neighbours(ranks, rank)
    if g == 1:
        return out.copy_(chunks[0])
    sending = chunks[(rank - 1) % g]  # the first hop sends our own chunk as it is: no copy
    spare = [torch.empty_like(out), torch.empty_like(out)]
    for s in range(g - 1):
        last = s == g - 2
        recv = spare[s % 2]
        _exchange(sending, recv, nxt, prv, pg, tag + s)
        mine = chunks[(rank - 2 - s) % g]  # the received running sum is of this chunk
        if last:
            torch.add(recv, mine, out=out)
        else:
            sending = recv.add_(mine)
    return out


def all_gather(out: torch.Tensor, t: torch.Tensor, ranks: tuple[int, ...], rank: int, pg,
               tag: int = _TAG_INLINE) -> torch.Tensor:
    """``out`` (contiguous; ``g`` chunks along dim 0, each the shape of ``t``) = every rank's ``t``, in group-rank
    order."""
    g = len(ranks)
    chunks = out.view(g, *t.shape)
    chunks[rank].copy_(t)
    nxt, prv = _neighbours(ranks, rank)
    for s in range(g - 1):
        _exchange(chunks[(rank - s) % g], chunks[(rank - s - 1) % g], nxt, prv, pg, tag + s)
    return out


def all_reduce(t: torch.Tensor, ranks: tuple[int, ...], rank: int, pg, tag: int = _TAG_INLINE) -> torch.Tensor:
    """``t`` (contiguous, its first dimension a multiple of the group size) = the sum over the group, in place:
    the reduce-scatter ring leaves this rank's chunk summed, the all-gather ring hands every chunk round, so
    every rank ends with the same bits."""
    g = len(ranks)
    if g == 1:
        return t
    chunks = t.view(g, -1)
    reduce_scatter(chunks[rank], t, ranks, rank, pg, tag)
    all_gather(t, chunks[rank], ranks, rank, pg, tag + g)  # its own chunk is in place already
    return t


class RingWork:
    """The handle of a started ring: ``wait()`` blocks until it is done and raises what it raised."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self) -> bool:
        self._done.wait()
        if self._error is not None:
            raise RuntimeError(f"a ring collective failed: {self._error}") from self._error
        return True


class _Lane:
    """One daemon thread running one process group's started rings, first started first."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], object], RingWork]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="plait-ring", daemon=True).start()

    def _run(self) -> None:
        while True:
            job, work = self.jobs.get()
            try:
                job()
            except BaseException as err:  # noqa: BLE001  (handed to the waiter, which raises it)
                work._finish(err)
            else:
                work._finish(None)


_lanes: dict[int, _Lane] = {}
_lanes_lock = threading.Lock()


def _enqueue(pg, job: Callable[[], object]) -> RingWork:
    with _lanes_lock:
        lane = _lanes.get(id(pg))
        if lane is None:
            lane = _lanes[id(pg)] = _Lane()
    work = RingWork()
    lane.jobs.put((job, work))
    return work


def reduce_scatter_start(out: torch.Tensor, t: torch.Tensor, ranks: tuple[int, ...], rank: int, pg) -> RingWork:
    """:func:`reduce_scatter` on the group's own thread; ``out`` and ``t`` must not be touched until the
    handle's ``wait()`` returns."""
    return _enqueue(pg, lambda: reduce_scatter(out, t, ranks, rank, pg, _TAG_LANE))


def all_reduce_start(t: torch.Tensor, ranks: tuple[int, ...], rank: int, pg) -> RingWork:
    """:func:`all_reduce` on the group's own thread; ``t`` must not be touched until the handle's ``wait()``
    returns."""
    return _enqueue(pg, lambda: all_reduce(t, ranks, rank, pg, _TAG_LANE))
