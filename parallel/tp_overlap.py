"""Sequence-parallel regions whose collectives overlap the GEMMs next to them (``parallel.tp_overlap``).

Plain TP+SP (:mod:`plait.parallel.tp`) all-gathers a region's input, then runs the column
linears on the whole sequence; at the end the row linear makes partial sums for the whole
sequence, which are then reduce-scattered. Each collective waits for, or is waited on by,
the whole GEMM. Here both are decomposed into the ``tp − 1`` steps of a ring over the tp
group (Wang et al., ASPLOS 2023, "Overlap Communication with Dependent Computation via
Decomposition"; the collective matmuls of Transformer Engine's userbuffers, Flux and
PyTorch's async TP), so that each step's transfer runs while a chunk's GEMM computes:

* **all-gather → GEMM** (:class:`_GatheredProjections`: ``wq, wk, wv``; ``w1, w3``): at
  step ``s`` rank ``r`` holds the input chunk of rank ``c = r − s`` (mod tp). It forwards
  that chunk to rank ``r + 1``, receives chunk ``c − 1`` from ``r − 1`` in its place, and
  multiplies chunk ``c`` by every weight into rows ``c·n …`` of the preallocated outputs
  (:func:`plait.ops.overlap.matmul_into`).
* **GEMM → reduce-scatter** (:class:`_ScatteredProjection`: ``wo``; ``w2``): the partial
  sum bound for chunk ``d`` starts on rank ``d + 1`` and travels the ring, each rank adding
  its own partial product; at step ``s`` rank ``r`` computes its part of chunk
  ``d = r − 1 − s`` while the running sums of the step before are in flight, then adds
  what it received. After ``tp − 1`` steps the sum that arrives last is the rank's chunk.

A chunk moves as :data:`PIECES` pieces along the sequence, each its own message: a piece
is computed on as soon as it has arrived and forwarded at once, and a running sum leaves
as soon as its piece is added, so a transfer also hides behind the pieces of the same
step that are already here (with tp = 2 there is one step per ring, and without pieces
the forward reduce-scatter could hide only behind half of one GEMM).

The backward of each is the other one: ``dx`` of all-gather → GEMM is a GEMM →
reduce-scatter of ``Σ_j dY_j W_j``, and ``dy`` of GEMM → reduce-scatter an all-gather of
``dz`` followed by GEMMs; the weight gradients (one GEMM per chunk, ``dYᵀ x``) are computed
inside the rings, adding work to hide the transfers behind.

Same math as plain TP+SP: every output element is the same dot product; only the order in
which the reduce-scatter's partial sums are added differs (fp32 reassociation over tp
terms). Bytes on the wire: per rank, ``tp − 1`` chunks ``[B, T/tp, dim]`` per ring, four
rings per region and micro-step (two forward, two backward), recorded as ``send`` on the
tp axis, one call per piece (:func:`plait.parallel.comm.ring_shift`); plain TP+SP records
the same traffic as one all-gather and one reduce-scatter per direction.

The model stays unaware of all this: :func:`overlap_attention` and :func:`overlap_mlp`
replace the module's ``project_qkv`` / ``project_in`` (its column linears, which return the
whole sequence) and its row linear's ``forward`` (which returns this rank's chunk).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from plait.errors import ConfigError
from plait.ops.overlap import matmul_into
from plait.parallel import comm
from plait.parallel.comm import Group


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in here (autocast's, inside an autocast region)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


# Each rank's chunk travels as this many pieces along the sequence: a rank starts on a piece as soon as it
# has arrived, while the next one is still on the wire, and a partial sum leaves as soon as its piece is
# computed. With one piece, tp = 2 hides each transfer only behind the GEMMs of the rank's own chunk (the
# forward reduce-scatter behind half of one GEMM); with two, also behind the first piece that arrives.
PIECES = 2
Stage = tuple[torch.Tensor, torch.Tensor] | None


def pieces_of(n: int) -> int:
    """Pieces per chunk of ``n`` positions (one where ``n`` does not split evenly)."""
    return PIECES if n % PIECES == 0 else 1


def all_gather_ring(local: torch.Tensor, group: Group, consume: Callable[[int, torch.Tensor, Stage], None]) -> torch.Tensor:
    """Pass every rank's chunk ``local`` [B, n, …] around the ring in :func:`pieces_of` ``(n)`` pieces of
    ``m`` positions, calling ``consume(row, piece, stage)`` on each as soon as it is here, while later ones are
    in flight (``row``: the piece's first position in the whole sequence). Returns every piece,
    [tp, pieces, B, m, …] in group-rank order.

    ``consume`` must make the copy ``stage`` = (src, dst) while it computes (``matmul_into``'s stage): the
    next piece of this rank's own chunk going into its contiguous send buffer.
    """
    tp, r = group.size, group.rank
    B, n = local.shape[:2]
    parts = pieces_of(n)
    m = n // parts
    buf = local.new_empty((tp, parts, B, m, *local.shape[2:]))
    own = [local[:, j * m:(j + 1) * m] for j in range(parts)]
    buf[r, 0].copy_(own[0])
    sends, arriving = [], {}
    for s in range(tp):
        c = (r - s) % tp
        for j in range(parts):
            if s > 0:
                comm.wait_all(arriving.pop(j), group)
            if s < tp - 1:  # forward the piece at once; the next chunk's piece j comes in its place
                send, recv = comm.ring_shift(buf[c, j], buf[(c - 1) % tp, j], group, tag=s * parts + j)
                sends.append(send)
                arriving[j] = [recv]
            stage = (own[j + 1], buf[r, j + 1]) if s == 0 and j + 1 < parts else None
            consume(c * n + j * m, own[j] if s == 0 else buf[c, j], stage)
    comm.wait_all(sends, group)
    return buf


def reduce_scatter_ring(shape: Sequence[int], like: torch.Tensor, group: Group,
                        partial: Callable[[int, torch.Tensor], None],
                        meanwhile: Callable[[int], None] | None = None) -> torch.Tensor:
    """The sum over the ranks of their ``partial(row, out)`` products (positions ``row … row + out.shape[1]`` of
    the whole sequence, written into ``out``) for this rank's own chunk, of ``shape`` [B, n, …]. Pieces as in
    :func:`all_gather_ring`: each running sum leaves as soon as its piece is added, and each GEMM runs while
    earlier sums are in flight.

    ``meanwhile(d)``: more work on chunk ``d`` (a weight gradient), run while transfers are in flight.
    """
    tp, r = group.size, group.rank
    B, n = shape[:2]
    parts = pieces_of(n)
    m = n // parts
    piece_shape = (B, m, *shape[2:])
    result = like.new_empty(shape)
    sends, arriving = [], {}
    for s in range(tp):
        d = (r - 1 - s) % tp
        last = s == tp - 1
        for j in range(parts):
            # the last step's sums are the result and stay here: written in place, not sent
            mine = result[:, j * m:(j + 1) * m] if last else like.new_empty(piece_shape)
            partial(d * n + j * m, mine)
            if s > 0:
                if j == parts - 1 and meanwhile is not None:
                    meanwhile((d + 1) % tp)
                recv, received = arriving.pop(j)
                comm.wait_all([recv], group)
                mine.add_(received)
            if not last:
                received = like.new_empty(piece_shape)
                send, recv = comm.ring_shift(mine, received, group, tag=s * parts + j)
                sends.append(send)
                arriving[j] = (recv, received)
    comm.wait_all(sends, group)
    if meanwhile is not None:
        meanwhile(r)
    return result


def _weight_grad_into(grad: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """``grad += Σ_b dy[b]ᵀ x[b]`` for dy [B, n, o], x [B, n, k], grad [o, k]: a weight gradient, piece by piece."""
    for b in range(dy.shape[0]):
        matmul_into(dy[b].t()[None], x[b].t(), grad[None], 0, accumulate=True)


class _GatheredProjections(torch.autograd.Function):
    """``[all_gather(x) @ W_jᵀ for W_j in weights]`` over the sequence dim 1, as a ring (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = _compute_dtype(x)
        local = x.to(dtype).contiguous()
        ws = [w.to(dtype) for w in weights]
        B, n, _ = local.shape
        outs = [local.new_empty((B, group.size * n, w.shape[0])) for w in ws]

        def consume(row: int, piece: torch.Tensor, stage: Stage) -> None:
            for j, w in enumerate(ws):
                matmul_into(piece, w, outs[j], row, stage=stage if j == 0 else None)

        gathered = all_gather_ring(local, group, consume)
        ctx.group, ctx.x_dtype = group, x.dtype
        ctx.save_for_backward(gathered, *weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        gathered, *weights = ctx.saved_tensors
        group = ctx.group
        dtype = gathered.dtype
        dys = [g.to(dtype) for g in grads]
        ws = [w.to(dtype) for w in weights]
        _, parts, B, m, k = gathered.shape
        n = parts * m
        wgrads = [torch.zeros(w.shape, dtype=dtype, device=w.device) for w in ws]

        def partial(row: int, out: torch.Tensor) -> None:  # this rank's part of dx: Σ_j dY_j W_j on those rows
            rows = slice(row, row + out.shape[1])
            for j, w in enumerate(ws):
                matmul_into(dys[j][:, rows], w.t(), out, 0, accumulate=j > 0)

        def weight_grads(d: int) -> None:
            for j, grad in enumerate(wgrads):
                for p in range(parts):
                    _weight_grad_into(grad, dys[j][:, d * n + p * m:d * n + (p + 1) * m], gathered[d, p])

        dx = reduce_scatter_ring((B, n, k), gathered, group, partial, weight_grads)
        return (dx.to(ctx.x_dtype), None, *(g.to(w.dtype) for g, w in zip(wgrads, weights)))


class _ScatteredProjection(torch.autograd.Function):
    """``reduce_scatter(y @ Wᵀ)`` over the sequence dim 1, as a ring (see the module docstring)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weight: torch.Tensor, group: Group) -> torch.Tensor:
        dtype = _compute_dtype(y)
        full = y.to(dtype)
        w = weight.to(dtype)
        B, T, _ = full.shape
        if T % group.size:
            raise ValueError(f"the sequence of {T} positions does not split into tp = {group.size} chunks")

        def partial(row: int, out: torch.Tensor) -> None:
            matmul_into(full[:, row:row + out.shape[1]], w, out, 0)

        ctx.group, ctx.y_dtype = group, y.dtype
        ctx.save_for_backward(full, weight)
        return reduce_scatter_ring((B, T // group.size, w.shape[0]), full, group, partial)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        full, weight = ctx.saved_tensors
        dtype = full.dtype
        w = weight.to(dtype)
        dy = full.new_empty(full.shape)
        wgrad = torch.zeros(w.shape, dtype=dtype, device=w.device)

        def consume(row: int, piece: torch.Tensor, stage: Stage) -> None:  # dy on the piece's rows, its part of dW
            matmul_into(piece, w.t(), dy, row, stage=stage)
            _weight_grad_into(wgrad, piece, full[:, row:row + piece.shape[1]])

        all_gather_ring(dz.to(dtype).contiguous(), ctx.group, consume)
        return dy.to(ctx.y_dtype), wgrad.to(weight.dtype), None


def gathered_projections(x: torch.Tensor, linears: Sequence[nn.Linear], group: Group) -> tuple[torch.Tensor, ...]:
    """The column linears of a region on the whole sequence, from this rank's chunk ``x`` [B, T/tp, dim]."""
    return _GatheredProjections.apply(x, group, *(lin.weight for lin in linears))


def scattered_projection(linear: nn.Linear, group: Group, y: torch.Tensor) -> torch.Tensor:
    """The row linear of a region on the whole sequence ``y``, reduce-scattered: this rank's [B, T/tp, dim]."""
    return _ScatteredProjection.apply(y, linear.weight, group)


def _check_region(module: nn.Module, column: Sequence[str], row: str, entry: str) -> None:
    if not callable(getattr(module, entry, None)):
        raise ConfigError("parallel.tp_overlap", True,
                          f"{type(module).__name__} has no {entry}(x) through which its column linears "
                          f"{', '.join(column)} run, so their all-gather cannot be replaced by a ring",
                          hint="set parallel.tp_overlap=false for this model")
    for name in (*column, row):
        # A bias would be added to every partial sum of the ring: the overlapped projections multiply only.
        if getattr(module, name).bias is not None:
            raise ConfigError("parallel.tp_overlap", True, f"{type(module).__name__}.{name} has a bias; the "
                              "overlapped projections take bias-free linears",
                              hint="set parallel.tp_overlap=false for this model")


def _overlap(module: nn.Module, column: Sequence[str], row: str, entry: str, group: Group) -> None:
    _check_region(module, column, row, entry)
    setattr(module, entry, functools.partial(gathered_projections, linears=tuple(getattr(module, n) for n in column),
                                             group=group))
    out = getattr(module, row)
    out.forward = functools.partial(scattered_projection, out, group)


def overlap_attention(module: nn.Module, group: Group) -> None:
    """Make an attention module (already split by :func:`plait.parallel.tp.apply_tp`) a ring region."""
    _overlap(module, ("wq", "wk", "wv"), "wo", "project_qkv", group)


def overlap_mlp(module: nn.Module, group: Group) -> None:
    """Make a SwiGLU MLP (already split by :func:`plait.parallel.tp.apply_tp`) a ring region."""
    _overlap(module, ("w1", "w3"), "w2", "project_in", group)
