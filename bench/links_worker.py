"""One of the two gloo processes of ``plait bench links``; rank 0 prints the pair's numbers as one JSON line.

``python -m plait.bench.links_worker RANK MASTER_ADDR PORT HINT_BIT_S SPAN_S ROUND_TRIPS``, with
GLOO_SOCKET_IFNAME set to the interface between the two. ``HINT_BIT_S`` (the link's shaped rate) sizes the
messages; how many are sent is taken from a first, untimed batch (the warm-up), so that the timed part
lasts about ``SPAN_S`` whatever the link really does.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import timedelta

# Messages of at most 4 MiB, each at most a twentieth of the span: many messages per measurement, so
# the first one's start-up and the last one's drain are a small part of it.
_MAX_MESSAGE = 4 << 20
_MIN_MESSAGE = 1 << 10
_WARM_S = 0.4
_UNTIMED_TRIPS = 10


def _message_bytes(hint_bit_s: float, span_s: float) -> int:
    return int(min(_MAX_MESSAGE, max(_MIN_MESSAGE, hint_bit_s / 8 * span_s / 20)))


def _count(seconds: float, done: int, span_s: float) -> int:
    return max(4, math.ceil(span_s / max(seconds, 1e-9) * done))


def _send_bit_s(torch, dist, rank: int, size: int, span_s: float, warm: int) -> float:
    """Payload bit/s from rank 0 to rank 1, timed on the receiver from its first timed message's arrival to
    its last: the sender's clock would stop while the last messages still sit in socket buffers."""
    message = torch.zeros(size // 4, dtype=torch.float32)
    count = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        for _ in range(warm):
            dist.send(message, 1)
        dist.recv(count, 1)
        for _ in range(int(count)):
            dist.send(message, 1)
        rate = torch.zeros(1, dtype=torch.float64)
        dist.recv(rate, 1)
        return float(rate)
    start = time.perf_counter()
    for _ in range(warm):
        dist.recv(message, 0)
    count[0] = _count(time.perf_counter() - start, warm, span_s) + 1
    dist.send(count, 0)
    dist.recv(message, 0)
    start = time.perf_counter()
    for _ in range(int(count) - 1):
        dist.recv(message, 0)
    rate = torch.tensor([(int(count) - 1) * size * 8 / (time.perf_counter() - start)], dtype=torch.float64)
    dist.send(rate, 0)
    return float(rate)


def _all_reduce_bus_bit_s(torch, dist, size: int, span_s: float, warm: int) -> float:
    """Bus bandwidth: size × 2(n-1)/n per all_reduce, which for n = 2 is the bytes each rank sends."""
    tensor = torch.ones(size // 4, dtype=torch.float32)
    start = time.perf_counter()
    for _ in range(warm):
        dist.all_reduce(tensor)
    count = torch.tensor([_count(time.perf_counter() - start, warm, span_s)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)  # both ranks must run the same number
    start = time.perf_counter()
    for _ in range(int(count)):
        dist.all_reduce(tensor)
    return int(count) * size * 8 / (time.perf_counter() - start)


def _round_trip_s(torch, dist, rank: int, round_trips: int) -> float:
    """Mean time of a 4-byte tensor's trip to the other rank and back; the first trips, which set up
    gloo's connection, are not timed."""
    tensor = torch.zeros(1, dtype=torch.float32)
    start = time.perf_counter()
    for trip in range(_UNTIMED_TRIPS + round_trips):
        if trip == _UNTIMED_TRIPS:
            start = time.perf_counter()
        if rank == 0:
            dist.send(tensor, 1)
            dist.recv(tensor, 1)
        else:
            dist.recv(tensor, 0)
            dist.send(tensor, 0)
    return (time.perf_counter() - start) / round_trips


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    rank, master, port = int(argv[0]), argv[1], int(argv[2])
    hint_bit_s, span_s, round_trips = float(argv[3]), float(argv[4]), int(argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    size = _message_bytes(hint_bit_s, span_s)
    warm = max(2, math.ceil(hint_bit_s / 8 * _WARM_S / size))
    round_trip = _round_trip_s(torch, dist, rank, round_trips)
    send = _send_bit_s(torch, dist, rank, size, span_s, warm)
    bus = _all_reduce_bus_bit_s(torch, dist, size, span_s, warm)
    if rank == 0:
        print(json.dumps({"message_bytes": size, "send_bit_s": send, "all_reduce_bus_bit_s": bus,
                          "round_trip_us": round_trip * 1e6}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from plait.parallel.teardown import run_and_exit

    run_and_exit(main, sys.argv[1:])
