"""Which number format each linear layer computes in: recipes, the per-module policy and the schedule.

A *recipe* names the formats of a linear layer's three GEMMs (forward ``y = x Wᵀ``, dgrad
``dx = dy W``, wgrad ``dW = dyᵀ x``). Each GEMM quantizes both operands along the dimension
it contracts (:mod:`plait.ops.quant`), and accumulates in FP32; master weights stay FP32.

==============  =====================================  ===========================================
recipe          forward (x, W)                         backward (dy; dgrad W, wgrad x)
==============  =====================================  ===========================================
``fp32``        float32 (or the job's dtype)           same
``bf16``        bfloat16 operands, FP32 accumulation   same
``fp8-tensor``  E4M3, one FP32 scale per tensor        dy E5M2 (the hybrid recipe), W/x E4M3
``fp8-row``     E4M3, one FP32 scale per row           E4M3 per row (torchao's row-wise recipe)
``fp8-block``   x 1×128 tiles, W 128×128 blocks, E4M3  dy 1×128, W 128×128, x 1×128 (DeepSeek-V3)
``mxfp8``       MXFP8 (32-element blocks, E8M0 scale)  MXFP8
``mxfp4``       MXFP4                                  MXFP8 (the FP4 pre-training paper: backward in FP8)
``nvfp4``       NVFP4 (16-element blocks, E4M3 scale   NVFP4; dy stochastically rounded; a random
                and an FP32 tensor scale)              Hadamard transform on the wgrad inputs
==============  =====================================  ===========================================

The *policy* maps module names (globs, e.g. ``layers.*.attn.*``) to recipes, first match
wins; a module no rule matches takes the recipe of the step. Unless
``precision.keep_edges`` is false, three rules follow the user's: the output head, every
MoE router and the last block stay in the job's dtype, as the published recipes do. The
*schedule* gives the recipe (and optionally a policy) of each step range, e.g. the FP4
paper's target-precision stage: FP4 for most of training, higher precision at the end.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from plait.errors import ConfigError

RECIPES = ("fp32", "bf16", "fp8-tensor", "fp8-row", "fp8-block", "mxfp8", "mxfp4", "nvfp4")
HIGH = ("fp32", "bf16")  # recipes that do not quantize


@dataclass(frozen=True)
class Operand:
    """How one operand of one GEMM is quantized (along the GEMM's contraction dimension)."""

    fmt: str  # a plait.ops.quant format: fp8-tensor | fp8-row | fp8-1x128 | fp8-128x128 | mxfp8 | mxfp4 | nvfp4
    elem: str = "e4m3"  # fp8-* formats: e4m3 | e5m2
    stochastic: bool = False  # seeded stochastic rounding (gradients)
    block_rows: int = 1  # nvfp4: 16 for 16×16 tiles (2-D weight scaling)
    mx_scale: str = "floor"  # mxfp8/mxfp4 block scales: floor (OCP) | up (never saturates a block's largest element)


@dataclass(frozen=True)
class Formats:
    """The operands of a linear layer's three GEMMs under one recipe."""

    recipe: str
    x: Operand  # forward: x [tokens, in] along in
    w: Operand  # forward: W [out, in] along in
    dy: Operand  # dgrad: dy [tokens, out] along out
    wt: Operand  # dgrad: Wᵀ [in, out] along out
    dyt: Operand  # wgrad: dyᵀ [out, tokens] along tokens
    xt: Operand  # wgrad: xᵀ [in, tokens] along tokens
    hadamard: bool = False  # wgrad: dyᵀ and xᵀ rotated along tokens by one random 16×16 Hadamard per block

    def operands(self) -> dict[str, Operand]:
        return {name: getattr(self, name) for name in ("x", "w", "dy", "wt", "dyt", "xt")}


def _same(op: Operand, recipe: str, *, grad: Operand | None = None, hadamard: bool = False) -> Formats:
    g = grad or op
    return Formats(recipe, x=op, w=op, dy=g, wt=op, dyt=g, xt=op, hadamard=hadamard)


def formats(recipe: str, *, stochastic_grads: bool = True, hadamard: bool = True, weight_tiles: bool = True,
            mx_scale: str = "up") -> Formats | None:
    """The formats of ``recipe``; None for the recipes that do not quantize (fp32, bf16). The
    defaults are :class:`PrecisionConfig`'s.

    ``weight_tiles`` (nvfp4): W and Wᵀ scaled per 16×16 tile, so the forward and the dgrad
    GEMMs see the same quantized weights (the NVFP4 paper's 2-D weight scaling); False: 1×16.
    ``mx_scale`` (mxfp8, mxfp4): "up" (Mishra et al. 2025) or "floor" (OCP).
    """
    if recipe in HIGH:
        return None
    if recipe in ("mxfp8", "mxfp4"):
        fp4, fp8 = Operand("mxfp4", mx_scale=mx_scale), Operand("mxfp8", mx_scale=mx_scale)
        if recipe == "mxfp8":
            return _same(fp8, recipe)
        return Formats(recipe, x=fp4, w=fp4, dy=fp8, wt=fp8, dyt=fp8, xt=fp8)
    if recipe == "fp8-tensor":
        return _same(Operand("fp8-tensor"), recipe, grad=Operand("fp8-tensor", "e5m2"))
    if recipe == "fp8-row":
        return _same(Operand("fp8-row"), recipe)
    if recipe == "fp8-block":
        tile, block = Operand("fp8-1x128"), Operand("fp8-128x128")
        return Formats(recipe, x=tile, w=block, dy=tile, wt=block, dyt=tile, xt=tile)
    if recipe == "nvfp4":
        fp4, grad = Operand("nvfp4"), Operand("nvfp4", stochastic=stochastic_grads)
        weight = Operand("nvfp4", block_rows=16) if weight_tiles else fp4
        return Formats(recipe, x=fp4, w=weight, dy=grad, wt=weight, dyt=grad, xt=fp4, hadamard=hadamard)
    raise ValueError(f"unknown recipe {recipe!r}; accepted: {' | '.join(RECIPES)}")


@dataclass(kw_only=True)
class PolicyRule:
    """``precision.policy[i]``: modules whose name matches the glob ``match`` compute in ``recipe``."""

    match: str
    recipe: str


@dataclass(kw_only=True)
class ScheduleStage:
    """``precision.schedule[i]``: steps before ``until`` (0: to the end) use ``recipe`` (and ``policy`` if given)."""

    until: int = 0
    recipe: str = "fp32"
    policy: list[PolicyRule] | None = None


@dataclass(kw_only=True)
class PrecisionConfig:
    """``precision.*``: the number formats of the linear layers (see :mod:`plait.parallel.precision`)."""

    recipe: str = "fp32"  # of every linear no rule matches; fp32 | bf16 | fp8-tensor | fp8-row | fp8-block | mxfp8 | mxfp4 | nvfp4
    policy: list[PolicyRule] = field(default_factory=list)  # module-name globs → recipe, first match wins
    keep_edges: bool = True  # the output head, the routers and the last block stay in the job's dtype
    schedule: list[ScheduleStage] = field(default_factory=list)  # recipes by step range (replaces recipe)
    stochastic_grads: bool = True  # nvfp4: gradients (dy) stochastically rounded
    hadamard: bool = True  # nvfp4: random Hadamard transform of the wgrad inputs
    weight_tiles: bool = True  # nvfp4: weights scaled per 16×16 tile, the same quantized W in forward and dgrad
    mx_scale: str = "up"  # mxfp8/mxfp4 block scales: up (Mishra et al. 2025: no block saturates) | floor (OCP v1.0)
    seed: int = 0  # of stochastic rounding and the Hadamard signs
    stats_every: int = 10  # steps between quantization statistics (amax, overflow, underflow); 0: never
    ab: str = ""  # a recipe: train a reference model in it alongside, same data and seed (`plait train --ab`)

    def quantizes(self) -> bool:
        """Whether any step of any module computes in a quantized recipe."""
        recipes = {self.recipe, *(r.recipe for r in self.policy)}
        for stage in self.schedule:
            recipes.add(stage.recipe)
            recipes.update(r.recipe for r in stage.policy or [])
        return bool(recipes - set(HIGH))

    def formats(self, recipe: str) -> Formats | None:
        """:func:`formats` of ``recipe`` with this config's options."""
        return formats(recipe, stochastic_grads=self.stochastic_grads, hadamard=self.hadamard,
                       weight_tiles=self.weight_tiles, mx_scale=self.mx_scale)

    def validate(self) -> None:
        _check_recipe("precision.recipe", self.recipe)
        if self.mx_scale not in ("floor", "up"):
            raise ConfigError("precision.mx_scale", self.mx_scale,
                              "accepted: floor (OCP: floor(log2 amax) - emax) | up (the smallest scale that saturates nothing)")
        _check_rules("precision.policy", self.policy)
        if self.ab:
            _check_recipe("precision.ab", self.ab)
        if self.stats_every < 0:
            raise ConfigError("precision.stats_every", self.stats_every, "accepted: 0 (never) or a positive number of steps")
        last = 0
        for i, stage in enumerate(self.schedule):
            key = f"precision.schedule[{i}]"
            _check_recipe(f"{key}.recipe", stage.recipe)
            _check_rules(f"{key}.policy", stage.policy or [])
            final = i == len(self.schedule) - 1
            if stage.until < 0 or (stage.until == 0 and not final):
                raise ConfigError(f"{key}.until", stage.until,
                                  "accepted: a step number > the previous stage's (0 only in the last stage: to the end)")
            if stage.until and stage.until <= last:
                raise ConfigError(f"{key}.until", stage.until,
                                  f"stages must end in increasing steps; the previous stage ends at {last}")
            last = stage.until or last

    def stage(self, step: int) -> tuple[str, list[PolicyRule]]:
        """The default recipe and the user's policy of 0-based ``step``."""
        for s in self.schedule:
            if s.until == 0 or step < s.until:
                return s.recipe, self.policy if s.policy is None else s.policy
        return self.recipe, self.policy

    def boundaries(self) -> list[int]:
        """Steps where the schedule changes the recipes."""
        return [s.until for s in self.schedule if s.until]


def _check_recipe(key: str, recipe: str) -> None:
    if recipe not in RECIPES:
        from plait.errors import did_you_mean

        raise ConfigError(key, recipe, f"accepted: {' | '.join(RECIPES)}", hint=did_you_mean(recipe, list(RECIPES)))


def _check_rules(key: str, rules: list[PolicyRule]) -> None:
    for i, rule in enumerate(rules):
        if not rule.match:
            raise ConfigError(f"{key}[{i}].match", rule.match, "accepted: a module-name glob, e.g. 'layers.*.attn.*'")
        _check_recipe(f"{key}[{i}].recipe", rule.recipe)


def edge_rules(layers: int, base: str) -> list[PolicyRule]:
    """The rules ``keep_edges`` adds: output head, routers and the last block in ``base``."""
    return [PolicyRule(match="output", recipe=base), PolicyRule(match="*.router", recipe=base),
            PolicyRule(match=f"layers.{layers - 1}.*", recipe=base)]


def resolve(config: PrecisionConfig, names: list[str], *, step: int, layers: int, base: str) -> dict[str, str]:
    """The recipe of each module name at ``step`` (``base``: the job's dtype as a recipe, fp32 or bf16)."""
    default, rules = config.stage(step)
    if config.keep_edges:
        rules = [*rules, *edge_rules(layers, base)]
    out = {}
    for name in names:
        recipe = next((r.recipe for r in rules if fnmatch.fnmatchcase(name, r.match)), default)
        out[name] = base if recipe == "fp32" and base == "bf16" else recipe
    return out


def check_policy_matches(config: PrecisionConfig, names: list[str]) -> None:
    """Every user rule must match at least one linear: a typo would otherwise silently do nothing."""
    groups = [("precision.policy", config.policy)]
    groups += [(f"precision.schedule[{i}].policy", s.policy or []) for i, s in enumerate(config.schedule)]
    for key, rules in groups:
        for i, rule in enumerate(rules):
            if not any(fnmatch.fnmatchcase(n, rule.match) for n in names):
                shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
                raise ConfigError(f"{key}[{i}].match", rule.match,
                                  f"matches none of the model's linear layers ({shown})",
                                  hint="globs match whole names, e.g. 'layers.*.ffn.*' or '*.wq'")
