"""Building blocks: RMSNorm, rotary position embedding, causal attention, SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq_len, head_dim // 2], in float32 (computed in float64)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape [..., T, D] by position-dependent angles.

    ``cos`` and ``sin`` are [T, D // 2]. The pair rotated together is (x[i], x[i + D/2])
    (the "rotate half" layout). Computed in at least float32, returned in the dtype of ``x``.
    """
    half = x.shape[-1] // 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    x1, x2 = xf[..., :half], xf[..., half:]
    cos = cos.to(dtype)
    sin = sin.to(dtype)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables for positions ``0 .. seq_len-1`` as non-persistent buffers."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.seq_len = seq_len
        self.theta = theta
        cos, sin = rotary_tables(head_dim, seq_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers too; the tables stay float32 (bf16 would keep
        # only ~3 significant digits of the angles), recomputed on the new device.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            device = self.cos.device
            if device.type == "meta":
                cos = torch.empty(self.cos.shape, dtype=torch.float32, device=device)
                sin = torch.empty(self.sin.shape, dtype=torch.float32, device=device)
            else:
                cos, sin = (t.to(device) for t in rotary_tables(self.head_dim, self.seq_len, self.theta))
            self.cos, self.sin = cos, sin
        return self

    def reset_buffers(self) -> None:
        """Recompute the tables in place (after ``to_empty`` from the meta device)."""
        cos, sin = rotary_tables(self.head_dim, self.seq_len, self.theta)
        with torch.no_grad():
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def forward(self, seq_len: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``positions`` (LongTensor [T]) or, when None, for ``0 .. seq_len-1``."""
        if positions is not None:
            return self.cos[positions], self.sin[positions]
        if seq_len > self.seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.seq_len={self.seq_len}")
        return self.cos[:seq_len], self.sin[:seq_len]


def _attend_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Causal attention of one row [1, H, T, D] of packed documents, each document on its own."""
    out, at = [], 0
    for n in lengths:
        out.append(F.scaled_dot_product_attention(q[:, :, at:at + n], k[:, :, at:at + n], v[:, :, at:at + n],
                                                  is_causal=True))
        at += n
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary q/k.

    q, k, v and o are separate linears (no bias). The number of heads is taken from the
    width of ``wq``'s output at run time, so a column-sharded ``wq/wk/wv`` and a row-sharded
    ``wo`` work unchanged with a local subset of heads.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """``documents``: per row, the lengths of the documents packed into it, with ``cos``/``sin``
        [B, T, D/2] restarting per document; each document is attended on its own (causal work Σ L², not T²).
        None: one causal sequence per row."""
        q, k, v = self.project_qkv(x)
        b, t, _ = q.shape  # the positions the projections cover (more than x's when they gather a sequence)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if documents is None:
            y = self.attend(q, k, v)
        elif "attend" in self.__dict__:
            raise ValueError("packed documents are attended on one rank: a sequence split over ranks (context "
                             "parallelism) holds one document")
        else:
            y = torch.cat([_attend_documents(q[r:r + 1], k[r:r + 1], v[r:r + 1], lengths)
                           for r, lengths in enumerate(documents)])
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.wo(y)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``wq(x), wk(x), wv(x)``, each [B, T, width].

        An instance attribute of the same name replaces it, e.g. with projections that gather
        a sequence split across ranks chunk by chunk while they multiply.
        """
        return self.wq(x), self.wk(x), self.wv(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q, k, v [B, H, T, D] over the positions this module sees.

        An instance attribute of the same name replaces it, e.g. with attention over a
        sequence split across ranks.
        """
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` with w1 = gate, w3 = up, w2 = down, no biases."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)

    def project_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w1(x), w3(x)`` (gate, up); an instance attribute of the same name replaces it, as
        :meth:`Attention.project_qkv`."""
        return self.w1(x), self.w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_in(x)
        return self.w2(F.silu(gate) * up)
