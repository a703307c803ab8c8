"""The job configuration: a tree of component-owned dataclasses, loaded from YAML.

Precedence is defaults < file < ``--set key=value`` overrides, resolved in one function,
:func:`load_config`. Every mistake a user can make (unknown key, wrong type, inconsistent
values) raises :class:`plait.errors.ConfigError` naming the dotted key, the value and
what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from plait.errors import ConfigError, did_you_mean
from plait.parallel.config import ParallelConfig
from plait.parallel.precision import PrecisionConfig
from plait.runtime.data import DataConfig
from plait.runtime.launch import LaunchConfig
from plait.runtime.control.config import ControlConfig
from plait.runtime.metrics import MetricsConfig
from plait.runtime.snapshot.config import SnapshotConfig
from plait.runtime.models.config import ModelConfig
from plait.runtime.trainer import TrainConfig
from plait.scheduler.spec import ModelSpec


@dataclass(kw_only=True)
class JobConfig:
    """Everything ``plait train`` needs, one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    def validate(self) -> None:
        """Check each section, then the rules that span sections."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        world = self.launch.nproc
        self.snapshot.check_nodes(self.launch.nnodes)
        self.parallel.placement_of(world, self.launch.nnodes)
        dims = self.parallel.dims(world)
        self._check_documents(dims)
        self._check_compress(dims)
        self._check_co2(dims)
        self._check_precision()
        if self.parallel.tp_overlap and dims.tp > 1 and self.precision.quantizes():
            raise ConfigError("parallel.tp_overlap", True, "the overlapped projections multiply in the model's own "
                              "dtype, so the quantized precision recipe would not apply to them",
                              hint="set parallel.tp_overlap=false, or a precision recipe that does not quantize")
        documents = self.data.packing == "documents"
        # A step of documents is train.global_batch whole documents, not micro-batches of windows.
        dims.check_model(model_spec(self.model), vpp=self.parallel.vpp,
                         global_batch=self.train.micro_batch * dims.dp if documents else self.train.global_batch,
                         micro_batch=self.train.micro_batch)
        dp = dims.dp
        if (self.parallel.pp > 1 and self.parallel.pp_schedule == "interleaved" and not documents
                and self.accumulation() % self.parallel.pp):
            raise ConfigError(
                "train.global_batch", self.train.global_batch,
                f"the interleaved schedule needs the micro-batches per step, global_batch / (micro_batch × dp) = "
                f"{self.accumulation()}, to be a multiple of parallel.pp={self.parallel.pp}",
            )
        if documents:
            if self.train.global_batch % dp:
                raise ConfigError("train.global_batch", self.train.global_batch,
                                  f"documents per step: the held-out windows are shared by the {dp} ranks, so it "
                                  f"must be a multiple of dp = {dp}", hint=f"e.g. {-(-self.train.global_batch // dp) * dp}")
            return
        per_rank = self.train.micro_batch * dp
        if self.train.global_batch % per_rank:
            lo = (self.train.global_batch // per_rank) * per_rank
            suggestion = ", ".join(str(v) for v in (lo, lo + per_rank) if v > 0)
            raise ConfigError(
                "train.global_batch", self.train.global_batch,
                f"must be a multiple of train.micro_batch × dp = {self.train.micro_batch} × {dp} = {per_rank}",
                hint=f"e.g. {suggestion}",
            )

    def _check_co2(self, dims) -> None:
        """CO2's replicas train apart for a round: nothing a replica computes may need another replica's ranks."""
        p = self.parallel
        if p.dp_mode != "co2":
            return
        if p.hybrid_dp:
            raise ConfigError("parallel.dp_mode", p.dp_mode, "hybrid data parallelism places each step's documents "
                              "across the dp ranks, so they cannot train apart", hint="set parallel.hybrid_dp=false, "
                              "or parallel.dp_mode=sync")
        if self.model.kind == "moe" and (dims.cp * dims.tp) % (dims.ep * dims.etp):
            raise ConfigError("parallel.dp_mode", p.dp_mode,
                              f"co2 trains each data-parallel replica (cp·tp = {dims.cp * dims.tp} ranks) on its own, but "
                              f"an expert group (ep·etp = {dims.ep * dims.etp} ranks) would span replicas",
                              hint="choose ep·etp dividing cp·tp (e.g. parallel.ep=1), or parallel.dp_mode=sync")

    def _check_documents(self, dims) -> None:
        """data.packing=documents and parallel.hybrid_dp go together; hybrid DP replaces a static cp."""
        p, d, m = self.parallel, self.data, self.model
        if d.packing == "documents" and not p.hybrid_dp:
            raise ConfigError("data.packing", d.packing, "whole documents are placed by hybrid data parallelism",
                              hint="set parallel.hybrid_dp=true, or data.packing=windows")
        if not p.hybrid_dp:
            return
        if d.packing != "documents":
            raise ConfigError("parallel.hybrid_dp", True, "hybrid data parallelism balances whole documents",
                              hint="set data.packing=documents")
        if dims.cp != 1:
            raise ConfigError("parallel.cp", dims.cp, "hybrid data parallelism: its own per-document blocks of the dp "
                              "ranks replace a static cp", hint="set parallel.cp=1 (tensor, pipeline and expert "
                              "parallelism work with it)")
        if dims.dp & (dims.dp - 1):
            raise ConfigError("launch.nproc", self.launch.nproc,
                              f"hybrid data parallelism splits documents over power-of-two blocks of ranks, so dp "
                              f"({dims.dp}) must be a power of two", hint="use 1, 2, 4, 8, ... processes")
        unit = 2 * dims.dp * dims.tp
        if m.seq_len % unit:
            raise ConfigError("model.seq_len", m.seq_len,
                              f"a split document is padded to a multiple of 2 × its block × tp, up to 2 × dp × tp = "
                              f"{unit}, and its positions must fit the rotary table",
                              hint=f"use a multiple of {unit}")
        max_len = self.max_len()
        if max_len > m.seq_len:
            raise ConfigError("data.max_len", d.max_len, f"documents longer than model.seq_len = {m.seq_len} have "
                              "no rotary positions", hint=f"use at most {m.seq_len}")
        budget = self.hdp_budget()
        if max_len > budget * dims.dp:
            raise ConfigError("parallel.hdp_budget", p.hdp_budget,
                              f"{dims.dp} ranks of {budget} tokens cannot hold a document of data.max_len = "
                              f"{max_len}", hint=f"use at least {-(-max_len // dims.dp)}")

    def _check_compress(self, dims) -> None:
        """parallel.ep_compress=lsh needs experts whose tokens go through the expert dispatcher."""
        p = self.parallel
        if p.ep_compress == "none":
            return
        if self.model.kind != "moe":
            raise ConfigError("parallel.ep_compress", p.ep_compress, "compresses the expert all-to-all of a MoE model",
                              hint="set model.kind=moe, or parallel.ep_compress=none")
        if p.hybrid_dp and dims.ep * dims.etp == 1:
            raise ConfigError("parallel.ep_compress", p.ep_compress,
                              "under hybrid data parallelism without expert parallelism the experts run whole on "
                              "every rank, with no all-to-all to compress", hint="set parallel.ep > 1, or "
                              "parallel.ep_compress=none")
        p.lsh.validate(self.model.dim)

    def _check_precision(self) -> None:
        """Every precision rule must match a linear layer of this model (a typo would silently do nothing)."""
        if self.precision.ab:
            if self.snapshot.enabled:
                raise ConfigError("precision.ab", self.precision.ab, "the reference model of an A/B run is not held in "
                                  "snapshots, so a restore could not bring it back", hint="set snapshot.every=0")
            if self.data.packing == "documents":
                raise ConfigError("precision.ab", self.precision.ab, "A/B runs take fixed-length windows",
                                  hint="set data.packing to its default, or drop --ab")
        if not (self.precision.policy or any(s.policy for s in self.precision.schedule)):
            return
        import torch

        from plait.parallel.lowp import linear_names
        from plait.parallel.precision import check_policy_matches
        from plait.runtime.models import build_model

        with torch.device("meta"):
            names = linear_names(build_model(self.model))
        check_policy_matches(self.precision, names)

    def max_len(self) -> int:
        """Longest document piece in tokens (``data.max_len``, default ``model.seq_len``)."""
        return self.data.max_len or self.model.seq_len

    def hdp_budget(self) -> int:
        """Tokens one rank may hold in a hybrid data-parallel step."""
        return self.parallel.hdp_budget or self.train.micro_batch * self.model.seq_len

    def accumulation(self) -> int:
        """Micro-batches per rank per step: global = micro × accumulation × dp."""
        dp = self.parallel.resolved_dp(self.launch.nproc)
        return max(1, self.train.global_batch // (self.train.micro_batch * dp))


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, nproc: int | None = None, nnodes: int | None = None,
) -> JobConfig:
    """Defaults < file < overrides (``key=value`` with dotted keys) < ``nproc``, ``nnodes``; validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    if nproc is not None:
        _set_dotted(tree, "launch.nproc", nproc)
    if nnodes is not None:
        _set_dotted(tree, "launch.nnodes", nnodes)
    config = _build(JobConfig, tree, prefix="")
    config.validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (the inverse of loading it)."""
    return dataclasses.asdict(config)


def dump_config(config: JobConfig) -> str:
    """The fully resolved config as YAML, loadable by :func:`load_config`."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("--config", str(path), "accepted: the path of an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("--config", str(path), f"not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), f"the file must hold a mapping of sections, not a {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", item, "accepted: key=value with a dotted key, e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), child, "this key is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", data, "accepted: a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = [f"{prefix}{name}" for name in fields]
            raise ConfigError(
                dotted, value,
                f"not a known key; accepted under '{prefix.rstrip('.') or 'the top level'}': {', '.join(fields)}",
                hint=did_you_mean(dotted, known),
            )
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        close = did_you_mean(str(value), [str(c) for c in choices])
        raise ConfigError(key, value, f"accepted: {' | '.join(map(str, choices))}", hint=close)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(key, value, "accepted: a list, e.g. [3, 1]")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(err.accepted)
        raise ConfigError(key, value, " or ".join(errors))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "accepted: true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "accepted: an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; a float key takes it.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "accepted: a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "accepted: a string")
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def model_spec(model: ModelConfig) -> ModelSpec:
    """The planner's view of the model section."""
    moe = model.kind == "moe"
    return ModelSpec(
        kind=model.kind, layers=model.layers, dim=model.dim, heads=model.heads, ffn_dim=model.ffn_dim,
        vocab=model.vocab, seq_len=model.seq_len, experts=model.experts if moe else 1, top_k=model.top_k if moe else 1,
    )
