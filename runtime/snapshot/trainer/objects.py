"""The small Python state of a snapshot (step, loader, RNG states, histories) as JSON, never pickle.

A blob's header and a disk checkpoint's object record are read back by other processes
(a restoring worker, a later job, ``plait export``), so their format must not be able
to run code: this codec writes plain JSON with a few tagged types and reads back only
those. Tags (a one-key object whose key starts with ``$``):

=============  ==================================================================
``$t``          tuple (a list of encoded items)
``$d``          dict with any keys (a list of [key, value] pairs; keys encoded too)
``$b``          bytes (base64)
``$f``          a float that JSON cannot spell: "nan", "inf", "-inf"
``$a``          NumPy array [dtype, shape, base64 of the C-order bytes]
``$n``          NumPy scalar [dtype, base64]
``$x``          torch tensor (CPU) [dtype, shape, base64]
=============  ==================================================================

Plain dicts with string keys stay JSON objects unless a key starts with ``$`` (then
``$d``). dtypes are checked against an allow-list and sizes against the data, so a
crafted record is refused with :class:`ObjectsError`, never executed.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import torch

__all__ = ["ObjectsError", "encode", "decode", "dumps", "loads"]

_NUMPY_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
                 "float64"}
_TORCH_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "float16", "bfloat16", "float32", "float64"}
MAX_DEPTH = 64


class ObjectsError(ValueError):
    """The bytes are not an object record this codec wrote (bad JSON, unknown tag or dtype, wrong size)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(obj: Any) -> Any:
    """A JSON-ready value for ``obj`` (see the module docstring for what is supported)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$f": repr(obj)}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, tuple):
        return {"$t": [encode(v) for v in obj]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"$d": [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, (bytes, bytearray)):
        return {"$b": _b64(bytes(obj))}
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {"$a": [arr.dtype.name, list(arr.shape), _b64(arr.tobytes())]}
    if isinstance(obj, np.generic):
        return {"$n": [obj.dtype.name, _b64(obj.tobytes())]}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"$x": [str(t.dtype).removeprefix("torch."), list(t.shape), _b64(raw)]}
    raise ObjectsError(f"cannot store a {type(obj).__name__} in a snapshot's Python state; use plain values, "
                       "tuples, dicts, bytes, NumPy arrays or tensors")


def _shape(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(n, int) and n >= 0 for n in value):
        raise ObjectsError(f"bad shape {value!r}")
    return value


def decode(value: Any, depth: int = 0) -> Any:
    """Inverse of :func:`encode`; ObjectsError on anything it would not have written."""
    if depth > MAX_DEPTH:
        raise ObjectsError(f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode(v, depth + 1) for v in value]
    if not isinstance(value, dict):
        raise ObjectsError(f"unexpected JSON value of type {type(value).__name__}")
    if len(value) == 1:
        (tag, body), = value.items()
        if tag.startswith("$"):
            return _decode_tagged(tag, body, depth)
    if any(k.startswith("$") for k in value):
        raise ObjectsError(f"unknown tag among keys {sorted(value)}")
    return {k: decode(v, depth + 1) for k, v in value.items()}


def _decode_tagged(tag: str, body: Any, depth: int) -> Any:
    try:
        if tag == "$t":
            return tuple(decode(v, depth + 1) for v in body)
        if tag == "$d":
            return {_hashable(decode(k, depth + 1)): decode(v, depth + 1) for k, v in body}
        if tag == "$b":
            return base64.b64decode(body, validate=True)
        if tag == "$f":
            if body not in ("nan", "inf", "-inf"):
                raise ObjectsError(f"bad float {body!r}")
            return float(body)
        if tag == "$a":
            dtype, shape, data = body
            if dtype not in _NUMPY_DTYPES:
                raise ObjectsError(f"NumPy dtype {dtype!r} is not allowed")
            raw = base64.b64decode(data, validate=True)
            shape = _shape(shape)
            if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
                raise ObjectsError(f"array of {dtype}{shape} does not match its {len(raw)} bytes")
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        if tag == "$n":
            dtype, data = body
            if dtype not in _NUMPY_DTYPES:
                raise ObjectsError(f"NumPy dtype {dtype!r} is not allowed")
            raw = base64.b64decode(data, validate=True)
            if len(raw) != np.dtype(dtype).itemsize:
                raise ObjectsError(f"scalar of {dtype} does not match its {len(raw)} bytes")
            return np.frombuffer(raw, dtype=dtype)[0]
        if tag == "$x":
            dtype, shape, data = body
            if dtype not in _TORCH_DTYPES:
                raise ObjectsError(f"tensor dtype {dtype!r} is not allowed")
            dt = getattr(torch, dtype)
            raw = bytearray(base64.b64decode(data, validate=True))
            shape = _shape(shape)
            if len(raw) != math.prod(shape) * dt.itemsize:
                raise ObjectsError(f"tensor of {dtype}{shape} does not match its {len(raw)} bytes")
            if not raw:
                return torch.empty(shape, dtype=dt)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dt).reshape(shape).clone()
    except ObjectsError:
        raise
    except (TypeError, ValueError, AttributeError) as err:
        raise ObjectsError(f"bad {tag} record: {err}") from None
    raise ObjectsError(f"unknown tag {tag!r}")


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        raise ObjectsError(f"dict key of type {type(key).__name__} is not hashable") from None
    return key


def dumps(obj: Any) -> bytes:
    return json.dumps(encode(obj), separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes | bytearray | memoryview) -> Any:
    try:
        value = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as err:
        raise ObjectsError(f"not a JSON object record: {err}") from None
    return decode(value)
