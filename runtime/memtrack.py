"""Peak tensor memory of one process, measured exactly, so the planner's prediction can be checked.

Mechanism: ``plait._C`` wraps c10's CPU allocator (csrc/memory/cpu_tracker.cpp). Every
storage allocated through it adds its requested bytes to a process-wide live count when
it is allocated and takes them off when it is freed, and the highest live count since
the last reset is kept. It is exact (a counter at the one place every CPU tensor is
allocated, not a sample) and process-wide: allocations on any thread are counted — the
autograd engine's, intra-op workers', and gloo's work threads', where an all-gather
allocates its flat receive buffer. It needs no profiler, vendor library or tensor
walk per step: one mutex and one hash-map entry per allocation.

A window's peak is absolute: the live bytes of every counted storage (parameters,
gradients, optimizer state, flat buckets, saved activations, communication buffers,
temporaries inside ops and collectives), not the growth since the window began. Storages
allocated before the tracker was installed are not seen by the allocator; they are
found once at installation by walking the tensors the garbage collector knows
(deduplicated by storage) and added as a constant, which assumes they outlive the run —
the worker installs the tracker before it builds anything, so this is the few tensors
created at import time.

Counted: the bytes requested of c10's CPU allocator (``nbytes`` of each storage, so a
view costs nothing and a tensor's storage is counted once however many views share it).

Not counted: memory that is not a c10 CPU storage — gloo's and the OS's own buffers
(sockets, gloo's internal ``std::vector`` scratch), Python objects, numpy arrays (even
when ``torch.from_numpy`` wraps them), memory-mapped files and shared-memory segments
(snapshot buffers), the allocator's alignment and malloc's slack or fragmentation — so
it is tensor memory, not the process's resident set.

On a CUDA device the same window reads the CUDA caching allocator's own exact counters
(``torch.cuda.max_memory_allocated``), since device memory never passes through the CPU
allocator.

The tracker cannot be removed once installed (live storages hold its deleter); it stays
transparent for the rest of the process.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import plait  # noqa: F401  (registers torch.ops.plait.memtrack_*)
from plait.runtime.trainer import BaseHook, StepResult

if TYPE_CHECKING:
    from plait.runtime.trainer import Trainer

CPU_METHOD = "c10-cpu-allocator"
CUDA_METHOD = "cuda-caching-allocator"


def _untracked_live_bytes() -> int:
    """Bytes of the distinct live CPU storages the tracker did not allocate, found through the garbage collector."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu" or obj.layout != torch.strided:
            continue
        storage = obj.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in seen or torch.ops.plait.memtrack_tracks(ptr):
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total


class CpuMemoryTracker:
    """The process's CPU tensor memory: installs the allocator wrapper on construction (once per process)."""

    method = CPU_METHOD
    _pre_install: int | None = None  # the storages alive before the first installation, shared by every instance

    def __init__(self) -> None:
        if CpuMemoryTracker._pre_install is None:
            untracked = _untracked_live_bytes()
            if not torch.ops.plait.memtrack_install():
                raise RuntimeError("the CPU allocator in use cannot be wrapped (it has no raw deleter), so plait "
                                   "cannot count tensor memory; train without metrics.memory")
            CpuMemoryTracker._pre_install = untracked
        self.pre_install_bytes = CpuMemoryTracker._pre_install

    def live_bytes(self) -> int:
        """Every counted storage alive now."""
        return int(torch.ops.plait.memtrack_stats()[0]) + self.pre_install_bytes

    def start(self) -> int:
        """Open a window: the peak restarts from the live bytes, which it returns."""
        return int(torch.ops.plait.memtrack_reset_peak()) + self.pre_install_bytes

    def peak_bytes(self) -> int:
        """The most bytes alive at once since :meth:`start`."""
        return int(torch.ops.plait.memtrack_stats()[1]) + self.pre_install_bytes

    def allocations(self) -> int:
        """Allocations counted since installation (to tell that the tracker sees work at all)."""
        return int(torch.ops.plait.memtrack_stats()[2])


class CudaMemoryTracker:
    """The same windows over the CUDA caching allocator's counters of the current device."""

    method = CUDA_METHOD

    def live_bytes(self) -> int:
        return int(torch.cuda.memory_allocated())

    def start(self) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self.live_bytes()

    def peak_bytes(self) -> int:
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())


def tracker_for(device: torch.device) -> CpuMemoryTracker | CudaMemoryTracker:
    return CudaMemoryTracker() if device.type == "cuda" else CpuMemoryTracker()


@dataclass(frozen=True)
class Window:
    start_bytes: int  # live at the window's start
    peak_bytes: int  # the most alive at once inside it


class Measurement:
    """``with Measurement(tracker) as m: ...``, then ``m.window`` holds the window's start and peak bytes."""

    def __init__(self, tracker: CpuMemoryTracker | CudaMemoryTracker):
        self.tracker = tracker
        self.window: Window | None = None
        self._start = 0

    def __enter__(self) -> Measurement:
        self._start = self.tracker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.window = Window(self._start, self.tracker.peak_bytes())


class MemoryHook(BaseHook):
    """Every rank: the peak tensor memory of each training step after this attempt's first, maximised over steps.

    A step's window runs from just before the trainer takes the batch to the end of the
    optimizer step (forward and backward of every micro-batch, gradient reduction, AdamW,
    parameter all-gather); evaluation and the other hooks are outside it. The attempt's
    first step is left out: it allocates the optimizer state and warms caches, so it is
    not the steady state a planner predicts. At the end every rank's peak is gathered on
    rank 0 with :func:`plait.parallel.comm.gather_objects`, which the ledger does not
    record (the ledger counts only the training step's collectives).
    """

    def __init__(self, tracker: CpuMemoryTracker | CudaMemoryTracker):
        self.tracker = tracker
        self.first_step: int | None = None  # the attempt's first step: warm-up
        self.peak: int | None = None
        self.steps: list[int] | None = None  # [first, last] measured step
        self.gathered: list[int | None] | None = None  # rank 0, after on_end: every rank's peak, by layout rank
        self._open = False

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        if self.first_step is None:
            self.first_step = step
            return
        self.tracker.start()
        self._open = True

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        if not self._open:
            return
        self._open = False
        peak = self.tracker.peak_bytes()
        self.peak = peak if self.peak is None else max(self.peak, peak)
        self.steps = [self.steps[0] if self.steps else result.step, result.step]

    def on_end(self, trainer: Trainer) -> None:
        from plait.parallel import comm

        parts = comm.gather_objects((self.peak, self.steps), trainer.engine.meshes.group("world"))
        if parts is not None:
            self.gathered = [p[0] for p in parts]
            self.steps = parts[0][1]

    def summary(self) -> dict[str, Any] | None:
        """The summary's ``memory`` field (rank 0); None before every rank's peak was gathered."""
        if self.gathered is None:
            return None
        return {"peak_bytes": self.gathered, "steps": self.steps, "method": self.tracker.method}
