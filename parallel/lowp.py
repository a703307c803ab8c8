"""Low-precision linear layers: each GEMM of a linear computes on quantized operands.

:func:`apply_precision` gives every ``nn.Linear`` and every stacked-expert module of a
model a forward that looks up the module's recipe for the current step
(:mod:`plait.parallel.precision`) and, for a quantized recipe, runs :class:`_QuantLinear`:

* forward ``y = q(x) q(W)ᵀ``; dgrad ``dx = q(dy) q(Wᵀ)ᵀ``; wgrad ``dW = q(dyᵀ) q(xᵀ)ᵀ``, each
  operand quantized along the dimension its GEMM contracts (:func:`plait.ops.quant.quantize`)
  and multiplied with FP32 accumulation (:func:`plait.ops.qgemm.qmm`);
* master weights stay FP32 and are quantized once per optimizer step: the quantized W and
  Wᵀ are cached under the parameter's version counter, which the optimizer's in-place
  update bumps, and reused by every micro-batch of the step;
* the activation x is saved in its own dtype; the wgrad GEMM quantizes xᵀ along tokens;
* nvfp4: dy is stochastically rounded with a seed of (precision.seed, step, module, call),
  so a replayed step rounds the same way; the wgrad inputs are rotated along tokens by a
  random 16×16 Hadamard matrix R per module (RᵀR = I, so the product is unchanged in
  exact arithmetic while outliers are spread over 16 tokens before quantization).

Stacked experts (:class:`_QuantGroupedLinear`): under fp8-block, mxfp8, mxfp4 and nvfp4 the
forward and dgrad GEMMs of all local experts are one grouped GEMM each
(:func:`plait.ops.qgemm.qmm_grouped`: the tokens quantized once, the experts' weights
stacked and cached); wgrad contracts each expert's own tokens and runs per expert. Under
fp8-tensor and fp8-row (``torch._scaled_mm``) the experts run one by one.

Works under tensor/sequence parallelism (the linears' weights are the local shards), expert
parallelism (the local experts' slices), pipeline stages (the modules a stage keeps) and
ZeRO (parameters stay whole on every rank during forward and backward).

Statistics: every ``precision.stats_every`` steps, on the first forward and backward call of
each module in the step, the amax of x, W and dy, and the fractions of their elements that
overflow (would round beyond the element format's largest value) and underflow (non-zero,
quantized to zero). They cost about as much as the GEMMs themselves on the CPU, hence the
sampling.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel.precision import HIGH, Formats, Operand, PrecisionConfig, check_policy_matches, formats, resolve

# element formats: largest finite value and mantissa bits
_ELEM = {"e4m3": (448.0, 3), "e5m2": (57344.0, 2), "e2m1": (6.0, 1)}
_BLOCK = {"fp8-1x128": (1, 128), "fp8-128x128": (128, 128), "mxfp8": (1, 32), "mxfp4": (1, 32), "nvfp4": (1, 16)}
STAT_COLUMNS = ("amax_x", "amax_w", "amax_dy", "overflow_x", "underflow_x", "elements_x", "overflow_dy", "underflow_dy",
                "elements_dy")


def element_kind(op: Operand) -> str:
    if op.fmt in ("mxfp4", "nvfp4"):
        return "e2m1"
    if op.fmt == "mxfp8":
        return "e4m3"
    return op.elem


def element_scale(q) -> torch.Tensor:
    """The decode scale of every element of ``q`` [M, K] (float32), whatever the format."""
    M, K = q.shape
    s = q.scale.float()
    if q.global_scale is not None:
        s = s * q.global_scale.float()
    if q.fmt == "fp8-tensor":
        return s.expand(M, K)
    if q.fmt == "fp8-row":
        return s.expand(M, K)
    br, bc = _BLOCK[q.fmt]
    return s.repeat_interleave(br, 0)[:M].repeat_interleave(bc, 1)[:, :K]


def _hadamard16(seed: int) -> torch.Tensor:
    """R = H₁₆·D/4: Sylvester's Hadamard matrix, columns with random signs, orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (16,), generator=g, dtype=torch.float64) * 2 - 1
    return (h * signs / 4.0).float()


def _rotate_tokens(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``t`` [rows, tokens] with each run of 16 tokens multiplied by R (tokens zero-padded to 16)."""
    rows, tokens = t.shape
    pad = (-tokens) % 16
    if pad:
        t = F.pad(t, (0, pad))
    return (t.float().reshape(rows, -1, 16) @ r.t().to(t.device)).reshape(rows, tokens + pad)


def _even_tokens(dyt: torch.Tensor, xt: torch.Tensor, f: Formats) -> tuple[torch.Tensor, torch.Tensor]:
    """The wgrad operands [rows, tokens] with a zero token appended when FP4 packing needs an even count.

    A zero column adds nothing to ``dyᵀ x`` and does not change any block's amax.
    """
    if xt.shape[1] % 2 and (f.dyt.fmt in ("mxfp4", "nvfp4") or f.xt.fmt in ("mxfp4", "nvfp4")):
        return F.pad(dyt, (0, 1)), F.pad(xt, (0, 1))
    return dyt, xt


@dataclass
class _Module:
    """What the runtime keeps per module: its index (for seeds and stats rows) and Hadamard matrix."""

    index: int
    rotation: torch.Tensor
    forward_seen: bool = False
    backward_seen: bool = False
    calls: int = 0


class PrecisionRuntime:
    """The recipes of this step, the quantized-weight cache and the statistics of one rank's modules."""

    def __init__(self, config: PrecisionConfig, names: list[str], *, layers: int, base: str):
        self.config = config
        self.names = names
        self.layers = layers
        self.base = base
        self.modules = {n: _Module(i, _hadamard16(config.seed * 7919 + i)) for i, n in enumerate(names)}
        self.step = 0
        self.sampling = False
        self.recipes = resolve(config, names, step=0, layers=layers, base=base)
        self._formats: dict[str, Formats | None] = {}
        self._cache: dict[tuple, tuple[int, object]] = {}
        self.stats = torch.zeros(len(names), len(STAT_COLUMNS), dtype=torch.float64)
        self._refresh()

    def _refresh(self) -> None:
        c = self.config
        self._formats = {n: c.formats(r) for n, r in self.recipes.items()}

    def begin_step(self, step: int) -> None:
        """Set the 0-based step (the schedule's recipes) and start its statistics."""
        self.step = step
        recipes = resolve(self.config, self.names, step=step, layers=self.layers, base=self.base)
        if recipes != self.recipes:
            self.recipes = recipes
            self._refresh()
            self._cache.clear()
        self.stats.zero_()
        every = self.config.stats_every
        self.sampling = bool(every) and step % every == 0
        for m in self.modules.values():
            m.forward_seen = m.backward_seen = not self.sampling  # statistics on the first calls of a sampled step
            m.calls = 0

    def formats_of(self, name: str) -> Formats | None:
        return self._formats[name]

    # ---------------------------------------------------------------- quantization

    def weight(self, name: str, key: tuple, w: torch.Tensor, op: Operand, *, transpose: bool):
        """``w`` (or ``wᵀ``) quantized, from the cache while the parameter is unchanged."""
        from plait.ops.quant import quantize

        full_key = (name, key, transpose, op)
        version = w._version
        hit = self._cache.get(full_key)
        if hit is not None and hit[0] == version:
            return hit[1]
        src = w.detach()
        q = quantize((src.t() if transpose else src).contiguous(), op.fmt, elem=op.elem, mx_scale=op.mx_scale,
                     block_rows=op.block_rows)
        self._cache[full_key] = (version, q)
        return q

    def stacked_weight(self, name: str, tag: str, w: torch.Tensor, op: Operand, *, transpose: bool):
        """Stacked experts ``w`` [E, N, K] (each ``w[e]`` or ``w[e]ᵀ``) quantized as one [E, ...] QTensor, cached."""
        from plait.ops.qgemm import stack_experts
        from plait.ops.quant import quantize

        full_key = (name, ("stacked", tag), transpose, op)
        version = w._version
        hit = self._cache.get(full_key)
        if hit is not None and hit[0] == version:
            return hit[1]
        src = w.detach()
        q = stack_experts([quantize((s.t() if transpose else s).contiguous(), op.fmt, elem=op.elem, mx_scale=op.mx_scale,
                                    block_rows=op.block_rows) for s in src])
        self._cache[full_key] = (version, q)
        return q

    def quantize(self, name: str, t: torch.Tensor, op: Operand, *, salt: int = 0, stat: str | None = None):
        from plait.ops.quant import quantize

        m = self.modules[name]
        seed = 0
        rounding = "nearest"
        if op.stochastic:
            rounding = "stochastic"
            seed = _mix(self.config.seed, self.step, m.index, m.calls, salt)
        q = quantize(t.contiguous(), op.fmt, elem=op.elem, rounding=rounding, seed=seed, mx_scale=op.mx_scale,
                     block_rows=op.block_rows)
        if stat is not None:
            self._record(m.index, t, q, op, stat)
        return q

    def record_weight(self, name: str, w: torch.Tensor) -> None:
        row = self.stats[self.modules[name].index]
        row[1] = max(float(row[1]), float(w.detach().abs().max()))

    def _record(self, index: int, t: torch.Tensor, q, op: Operand, which: str) -> None:
        from plait.ops.quant import dequantize

        with torch.no_grad():
            x = t.detach().float()
            fmax, mant = _ELEM[element_kind(op)]
            scaled = x.abs() / element_scale(q)
            # rounds beyond the largest value (its half-ulp rounding region excluded): saturated
            over = int((scaled > fmax * (1 + 2.0 ** -(mant + 1))).sum())
            under = int(((x != 0) & (dequantize(q) == 0)).sum())
            row = self.stats[index]
            col = 0 if which == "x" else 2
            row[col] = max(float(row[col]), float(x.abs().max()) if x.numel() else 0.0)
            base = 3 if which == "x" else 6
            row[base] += over
            row[base + 1] += under
            row[base + 2] += x.numel()


def _mix(*values: int) -> int:
    """A 63-bit seed from a few integers (splitmix64 steps)."""
    z = 0
    for v in values:
        z = (z + (v & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


def _wgrad(rt: PrecisionRuntime, name: str, f: Formats, gy: torch.Tensor, x: torch.Tensor, *, salt: int) -> torch.Tensor:
    """``dW = q(dyᵀ) q(xᵀ)ᵀ`` (float32) over the tokens of ``gy`` [tokens, out] and ``x`` [tokens, in]: both
    quantized along tokens, after the module's Hadamard rotation when the recipe has one."""
    from plait.ops.qgemm import qmm

    dyt, xt = gy.t(), x.t()
    if f.hadamard:
        rotation = rt.modules[name].rotation
        dyt, xt = _rotate_tokens(dyt, rotation), _rotate_tokens(xt, rotation)
    dyt, xt = _even_tokens(dyt, xt, f)
    qdyt = rt.quantize(name, dyt, f.dyt, salt=salt)
    return qmm(qdyt, rt.quantize(name, xt, f.xt))


class _QuantLinear(torch.autograd.Function):
    """``y = x Wᵀ`` with the three GEMMs on quantized operands (FP32 accumulation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, rt: PrecisionRuntime, name: str, key: tuple) -> torch.Tensor:
        from plait.ops.qgemm import qmm

        f = rt.formats_of(name)
        m = rt.modules[name]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        first = not m.forward_seen
        m.forward_seen = True
        with torch.autocast(x.device.type, enabled=False):
            qx = rt.quantize(name, x2, f.x, stat="x" if first else None)
            qw = rt.weight(name, key, w, f.w, transpose=False)
            if first:
                rt.record_weight(name, w)
            y = qmm(qx, qw)
        m.calls += 1
        ctx.save_for_backward(x2, w)
        ctx.meta = (rt, name, key, f, shape, x.dtype, m.calls)
        return y.to(x.dtype).reshape(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        from plait.ops.qgemm import qmm

        x2, w = ctx.saved_tensors
        rt, name, key, f, shape, dtype, call = ctx.meta
        m = rt.modules[name]
        first = not m.backward_seen
        m.backward_seen = True
        gy2 = gy.reshape(-1, w.shape[0])
        dx = dw = None
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                qdy = rt.quantize(name, gy2, f.dy, salt=2 * call, stat="dy" if first else None)
                qwt = rt.weight(name, key, w, f.wt, transpose=True)
                dx = qmm(qdy, qwt).to(dtype).reshape(shape)
            if ctx.needs_input_grad[1]:
                dw = _wgrad(rt, name, f, gy2, x2, salt=2 * call + 1).to(w.dtype)
        return dx, dw, None, None, None


def quant_linear(rt: PrecisionRuntime, name: str, x: torch.Tensor, w: torch.Tensor, key: tuple = ()) -> torch.Tensor:
    """``x Wᵀ`` in the module's recipe of the current step."""
    recipe = rt.recipes[name]
    if recipe in HIGH:
        if recipe == "bf16" and x.dtype != torch.bfloat16:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return F.linear(x, w).to(x.dtype)
        return F.linear(x, w)
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], w.shape[0])
    return _QuantLinear.apply(x, w, rt, name, key)


def _linear_forward(module: nn.Linear, rt: PrecisionRuntime, name: str, x: torch.Tensor) -> torch.Tensor:
    y = quant_linear(rt, name, x, module.weight)
    return y if module.bias is None else y + module.bias


# recipes whose forward and dgrad operand pairs plait's grouped block-scaled GEMM takes
GROUPED = frozenset({"fp8-block", "mxfp8", "mxfp4", "nvfp4"})


class _QuantGroupedLinear(torch.autograd.Function):
    """Rows ``offsets[e]:offsets[e + 1]`` of ``x`` times ``w[e]ᵀ`` for stacked experts ``w`` [E, N, K].

    Forward and dgrad are one grouped GEMM each over all local experts (x and dy quantized
    once, the stacked weights from the cache); wgrad contracts each expert's own tokens,
    so it runs per expert, exactly as :class:`_QuantLinear` does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rt: PrecisionRuntime, name: str,
                tag: str) -> torch.Tensor:
        from plait.ops.qgemm import qmm_grouped

        f = rt.formats_of(name)
        m = rt.modules[name]
        first = not m.forward_seen
        m.forward_seen = True
        with torch.autocast(x.device.type, enabled=False):
            qx = rt.quantize(name, x, f.x, stat="x" if first else None)
            qw = rt.stacked_weight(name, tag, w, f.w, transpose=False)
            if first:
                rt.record_weight(name, w)
            y = qmm_grouped(qx, qw, offsets)
        m.calls += 1
        ctx.save_for_backward(x, w, offsets)
        ctx.meta = (rt, name, tag, f, x.dtype, m.calls)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        from plait.ops.qgemm import qmm_grouped

        x, w, offsets = ctx.saved_tensors
        rt, name, tag, f, dtype, call = ctx.meta
        m = rt.modules[name]
        first = not m.backward_seen
        m.backward_seen = True
        gy = gy.contiguous()
        dx = dw = None
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                qdy = rt.quantize(name, gy, f.dy, salt=2 * call, stat="dy" if first else None)
                dx = qmm_grouped(qdy, rt.stacked_weight(name, tag, w, f.wt, transpose=True), offsets).to(dtype)
            if ctx.needs_input_grad[1]:
                dw = torch.zeros_like(w)
                bounds = offsets.tolist()
                for e in range(w.shape[0]):
                    lo, hi = bounds[e], bounds[e + 1]
                    if hi == lo:
                        continue
                    dw[e] = _wgrad(rt, name, f, gy[lo:hi], x[lo:hi], salt=_mix(2 * call + 1, e)).to(w.dtype)
        return dx, dw, None, None, None, None


def _experts_forward(module: nn.Module, rt: PrecisionRuntime, name: str, x: torch.Tensor, counts) -> torch.Tensor:
    sizes = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if len(sizes) != module.num_experts:
        raise ValueError(f"got {len(sizes)} expert counts for {module.num_experts} experts")
    if rt.recipes[name] in GROUPED and sum(sizes) > 0:
        offsets = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.long)
        x = x.contiguous()

        def g(inp: torch.Tensor, w: torch.Tensor, tag: str) -> torch.Tensor:
            return _QuantGroupedLinear.apply(inp, w, offsets, rt, name, tag)

        return g(F.silu(g(x, module.w1, "w1")) * g(x, module.w3, "w3"), module.w2, "w2")
    outs = []
    for e, xs in enumerate(torch.split(x, sizes, dim=0)):
        h = F.silu(quant_linear(rt, name, xs, module.w1[e], ("w1", e))) * quant_linear(rt, name, xs, module.w3[e], ("w3", e))
        outs.append(quant_linear(rt, name, h, module.w2[e], ("w2", e)))
    return torch.cat(outs, dim=0)


def _is_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3 for n in ("w1", "w2", "w3"))


def linear_names(model: nn.Module) -> list[str]:
    """The modules a precision policy addresses: every nn.Linear and stacked-expert module, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_experts(m)]


def apply_precision(chunks: list[nn.Module], config: PrecisionConfig, names: list[str], *, layers: int,
                    base: str) -> PrecisionRuntime:
    """Give the linears of ``chunks`` (this rank's parts of the model) their low-precision forward.

    ``names``: the whole model's linear names (every rank has the same list, whatever it holds).
    """
    check_policy_matches(config, names)
    rt = PrecisionRuntime(config, names, layers=layers, base=base)
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if name not in rt.modules:
                continue
            if isinstance(module, nn.Linear):
                module.forward = functools.partial(_linear_forward, module, rt, name)
            elif _is_experts(module):
                module.forward = functools.partial(_experts_forward, module, rt, name)
    return rt


def weight_bytes(recipe: str, shape: tuple[int, int]) -> int:
    """Bytes of one [out, in] weight stored in ``recipe``'s forward format (data and scales)."""
    out_f, in_f = shape
    f = formats(recipe)
    if f is None:
        return out_f * in_f * (4 if recipe == "fp32" else 2)
    fmt = f.w.fmt
    if fmt in ("mxfp4", "nvfp4"):
        data = out_f * math.ceil(in_f / 2)
    else:
        data = out_f * in_f
    if fmt == "fp8-tensor":
        scales = 4
    elif fmt == "fp8-row":
        scales = 4 * out_f
    else:
        br, bc = _BLOCK[fmt]
        per = 4 if fmt.startswith("fp8-") else 1
        scales = per * math.ceil(out_f / br) * math.ceil(in_f / bc) + (4 if fmt == "nvfp4" else 0)
    return data + scales



def summarize(rt: PrecisionRuntime, amax: torch.Tensor, counts: torch.Tensor) -> dict[str, dict]:
    """Per module: recipe, amax of x / W / dy, overflow and underflow fractions of x and dy (all ranks)."""
    out = {}
    for name, m in rt.modules.items():
        recipe = rt.recipes[name]
        if recipe in HIGH:
            out[name] = {"recipe": recipe}
            continue
        a, c = amax[m.index].tolist(), counts[m.index].tolist()
        nx, ndy = max(c[2], 1.0), max(c[5], 1.0)
        out[name] = {"recipe": recipe, "amax_x": a[0], "amax_w": a[1], "amax_dy": a[2],
                     "overflow_x": c[0] / nx, "underflow_x": c[1] / nx, "overflow_dy": c[3] / ndy, "underflow_dy": c[4] / ndy}
    return out
