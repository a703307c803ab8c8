"""plait's custom operators (``torch.ops.plait.*``) and their Python entry points.

Importing this package also registers the ops' fake kernels, which ``torch.compile``
and ``FakeTensorMode`` need; the eager kernels come with ``plait._C``.
"""

from __future__ import annotations

from plait.ops.checksum import checksum, crc32c_kernels
from plait.ops.gf256 import (
    GF256_POLY,
    gf256_matmul_,
    gf256_matmul_kernels,
    gf256_mul,
    gf256_mul_add_,
    gf256_mul_add_reference,
)
from plait.ops.lsh import (
    Buckets,
    bucket_reduce,
    bucket_reduce_reference,
    bucket_scatter,
    lsh_hash,
    lsh_hash_reference,
    lsh_signs,
)
from plait.ops.overlap import matmul_into, matmul_into_reference
from plait.ops.qgemm import qmm, qmm_grouped, qmm_grouped_reference, qmm_reference
from plait.ops.quant import FORMATS as QUANT_FORMATS
from plait.ops.quant import QTensor, QuantStats, amax_stats, dequantize, quantize
from plait.ops.rs import ReedSolomon

__all__ = [
    "GF256_POLY",
    "QUANT_FORMATS",
    "Buckets",
    "QTensor",
    "QuantStats",
    "ReedSolomon",
    "bucket_reduce",
    "bucket_reduce_reference",
    "bucket_scatter",
    "amax_stats",
    "checksum",
    "crc32c_kernels",
    "dequantize",
    "gf256_matmul_",
    "gf256_matmul_kernels",
    "gf256_mul",
    "gf256_mul_add_",
    "gf256_mul_add_reference",
    "lsh_hash",
    "lsh_hash_reference",
    "lsh_signs",
    "matmul_into",
    "matmul_into_reference",
    "qmm",
    "qmm_grouped",
    "qmm_grouped_reference",
    "qmm_reference",
    "quantize",
]
