"""plait: a distributed training runtime for transformer and mixture-of-experts models."""

from __future__ import annotations

# torch first: plait._C links libtorch but carries no rpath to it.
import torch  # noqa: F401

from plait import _C  # noqa: F401  (registers torch.ops.plait.*)
from plait import ops  # noqa: F401  (fake kernels and references of those ops)
from plait.errors import PlaitError

__version__ = "0.1.0"

__all__ = ["PlaitError", "__version__"]
