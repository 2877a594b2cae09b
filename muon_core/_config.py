"""MuonConfig: one frozen, validated, serialisable configuration for every backend."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from muon_core._ns import NS_ALGORITHMS, NS_DTYPES, normalise_coefficients, ns_schedule
from muon_core._toml import dumps_toml

ALGORITHMS = ("muon", "adamw")
MOMENTUM_KINDS = ("ema", "sum")
LR_SCALINGS = ("original", "match_rms_adamw", "spectral", "none")
NONFINITE_POLICIES = ("raise", "skip")
LAYOUTS = ("out_in", "in_out")
SECOND_MOMENTS = ("none", "normuon", "adamuon")
TP_MODES = ("duplicated", "distributed", "blockwise")


def _fail(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"{key}={value!r} is invalid: expected {expected}")


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(key, value, f"one of {list(choices)}")


def _check_number(key: str, value: Any, *, low: float, high: float = math.inf,
                  low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "a finite number")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        _fail(key, value, f"a number in {left}{low}, {high}{right}")


def _unknown_keys(cls: type, data: Mapping[str, Any]) -> None:
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}: allowed keys are {allowed}")


def check_fields(cls: type, overrides: Mapping[str, Any], where: str) -> None:
    """Refuse keys that are not fields of the dataclass `cls`, naming the allowed ones."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}: expected {cls.__name__} fields "
                         f"{allowed}")


def _as_int_tuple(key: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, Sequence) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        _fail(key, value, "an int or a sequence of ints")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """Hyper-parameters of the AdamW part (parameters the plan does not route to Muon)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_number("adamw.lr", self.lr, low=0.0)
        if len(self.betas) != 2:
            _fail("adamw.betas", self.betas, "two numbers (beta1, beta2)")
        for i, beta in enumerate(self.betas):
            _check_number(f"adamw.betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        _check_number("adamw.eps", self.eps, low=0.0, low_open=True)
        _check_number("adamw.weight_decay", self.weight_decay, low=0.0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdamWConfig:
        """Build from a mapping, rejecting unknown keys."""
        _unknown_keys(cls, data)
        return cls(**data)

    def with_overrides(self, overrides: Mapping[str, Any],
                       where: str = "adamw overrides") -> AdamWConfig:
        """A copy with the given fields replaced; the others keep their values."""
        check_fields(AdamWConfig, overrides, where)
        return dataclasses.replace(self, **overrides)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A routing rule: parameters whose name matches `match` (fnmatch glob) and, when
    given, whose `ndim`/`shape` agree, get the listed decisions.

    `algorithm` is "muon" or "adamw"; `split` gives row-block sizes along the output
    dimension (fused QKV, GQA); `groups` says those rows are interleaved in that many equal
    groups, each holding its share of every block (GPT-NeoX's per-head [q, k, v]: groups =
    heads); `layout` ("out_in" or "in_out") says where the output axis of this tensor is;
    `out_axes`/`in_axes` are explicit dimension numbers (the remaining axes are batch axes,
    each slice orthogonalized alone).
    """

    match: str = "*"
    algorithm: str | None = None
    ndim: int | None = None
    shape: tuple[int, ...] | None = None
    split: tuple[int, ...] | None = None
    out_axes: tuple[int, ...] | None = None
    in_axes: tuple[int, ...] | None = None
    groups: int | None = None
    layout: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            _fail("rule.match", self.match, "a non-empty glob string")
        if self.algorithm is not None:
            _check_choice("rule.algorithm", self.algorithm, ALGORITHMS)
        if self.ndim is not None and (not isinstance(self.ndim, int) or self.ndim < 0):
            _fail("rule.ndim", self.ndim, "a non-negative int")
        for key in ("shape", "split", "out_axes", "in_axes"):
            object.__setattr__(self, key, _as_int_tuple(f"rule.{key}", getattr(self, key)))
        if self.split is not None and any(s <= 0 for s in self.split):
            _fail("rule.split", self.split, "positive block sizes")
        if (self.out_axes is None) != (self.in_axes is None):
            _fail("rule.out_axes/in_axes", (self.out_axes, self.in_axes), "both given or neither")
        if self.layout is not None:
            _check_choice("rule.layout", self.layout, LAYOUTS)
        if self.groups is not None:
            if isinstance(self.groups, bool) or not isinstance(self.groups, int) \
                    or self.groups < 1:
                _fail("rule.groups", self.groups, "a positive int")
            if self.split is None or any(s % self.groups for s in self.split):
                _fail("rule.groups", self.groups, f"a divisor of every split size "
                      f"(split={self.split})")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Build from a mapping, rejecting unknown keys."""
        _unknown_keys(cls, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The non-default fields, as plain Python values."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class MuonConfig:
    """Every hyper-parameter of the optimizer: Muon for hidden matrices, AdamW for the rest.

    Defaults match `torch.optim.Muon` except `ns_dtype`: "auto" computes Newton-Schulz in
    bfloat16 only where the device multiplies bfloat16 matrices natively (`auto_ns_dtype`),
    float32 elsewhere, where torch.optim.Muon always uses bfloat16. Names follow torch.optim
    where it has one.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    momentum_kind: str = "ema"
    ns_steps: int = 5
    ns_coefficients: Any = "keller"
    eps: float = 1e-7
    ns_dtype: str = "auto"
    ns_algorithm: str = "auto"
    lr_scaling: str = "original"
    split_qkv: bool = True
    nonfinite: str = "raise"
    second_moment: str = "none"
    beta2: float = 0.95
    second_moment_eps: float = 1e-8
    cautious_weight_decay: bool = False
    rules: tuple[Rule, ...] = ()
    adamw: AdamWConfig = AdamWConfig()
    qk_clip: Any = None  # a muon_core.QKClipConfig (or its mapping) turns QK-clip on
    tp_mode: str = "duplicated"  # tensor-parallel matrices: see docs/distributed.md

    def __post_init__(self) -> None:
        from muon_core._qk_clip import QKClipConfig

        object.__setattr__(self, "qk_clip", QKClipConfig.from_value(self.qk_clip))
        _check_number("lr", self.lr, low=0.0)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _check_number("eps", self.eps, low=0.0, low_open=True)
        _check_choice("second_moment", self.second_moment, SECOND_MOMENTS)
        _check_number("beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        _check_number("second_moment_eps", self.second_moment_eps, low=0.0, low_open=True)
        for key in ("nesterov", "split_qkv", "cautious_weight_decay"):
            if not isinstance(getattr(self, key), bool):
                _fail(key, getattr(self, key), "True or False")
        if isinstance(self.ns_steps, bool) or not isinstance(self.ns_steps, int) \
                or not 1 <= self.ns_steps <= 100:
            _fail("ns_steps", self.ns_steps, "an int in [1, 100]")
        _check_choice("momentum_kind", self.momentum_kind, MOMENTUM_KINDS)
        _check_choice("ns_dtype", self.ns_dtype, NS_DTYPES)
        _check_choice("ns_algorithm", self.ns_algorithm, NS_ALGORITHMS)
        _check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _check_choice("tp_mode", self.tp_mode, TP_MODES)
        object.__setattr__(self, "ns_coefficients", normalise_coefficients(self.ns_coefficients))
        ns_schedule(self.ns_coefficients, self.ns_steps)  # rejects unknown preset names
        adamw = self.adamw
        if isinstance(adamw, Mapping):
            adamw = AdamWConfig.from_dict(adamw)
        if not isinstance(adamw, AdamWConfig):
            _fail("adamw", adamw, "an AdamWConfig or a mapping")
        object.__setattr__(self, "adamw", adamw)
        rules = tuple(Rule.from_dict(r) if isinstance(r, Mapping) else r for r in self.rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                _fail(f"rules[{i}]", rule, "a Rule or a mapping")
        object.__setattr__(self, "rules", rules)

    # -- presets ---------------------------------------------------------------
    @classmethod
    def moonlight(cls, lr: float = 3e-4, weight_decay: float = 0.1, **overrides: Any) -> MuonConfig:
        """Moonlight's recipe: `match_rms_adamw` scaling, so Muon and AdamW share one lr and wd."""
        adamw = AdamWConfig(lr=lr, weight_decay=weight_decay, **overrides.pop("adamw", {}))
        return cls(lr=lr, weight_decay=weight_decay, lr_scaling="match_rms_adamw",
                   adamw=adamw, **overrides)

    @classmethod
    def adamuon(cls, lr: float = 0.02, beta2: float = 0.95, **overrides: Any) -> MuonConfig:
        """AdaMuon: an elementwise second moment of the orthogonalized update, each matrix
        keeping its norm (`second_moment="adamuon"`); the best of plain Muon, NorMuon and
        AdaMuon on the project's character model (docs/hyperparameters.md)."""
        return cls(lr=lr, second_moment="adamuon", beta2=beta2, **overrides)

    @classmethod
    def quintic4(cls, **overrides: Any) -> MuonConfig:
        """Newton-Schulz with the quintic coefficients in 4 steps: one product round fewer than
        the default keller-5, closer to the polar factor, and as good in training on the
        project's character model (docs/benchmarks.md)."""
        return cls(**{"ns_coefficients": "quintic", "ns_steps": 4} | overrides)

    # -- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists, not tuples) that `from_dict` reads back."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "adamw":
                value = {**dataclasses.asdict(value), "betas": list(value.betas)}
            elif field.name == "rules":
                value = [rule.to_dict() for rule in value]
            elif field.name == "ns_coefficients" and not isinstance(value, str):
                value = [list(t) for t in value]
            elif field.name == "qk_clip" and value is not None:
                value = value.to_dict()
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MuonConfig:
        """Build from a mapping (as written by `to_dict`), rejecting unknown keys."""
        if not isinstance(data, Mapping):
            _fail("config", data, "a mapping")
        _unknown_keys(cls, data)
        return cls(**data)

    def to_json(self) -> str:
        """JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MuonConfig:
        """Read JSON text."""
        return cls.from_dict(json.loads(text))

    def to_toml(self) -> str:
        """TOML text."""
        return dumps_toml(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> MuonConfig:
        """Read TOML text; a `[muon]` table is used when present (so it can live in a larger file)."""
        data = tomllib.loads(text)
        return cls.from_dict(data.get("muon", data))

    @classmethod
    def from_file(cls, path: str | Path) -> MuonConfig:
        """Read a `.toml` or `.json` file."""
        path = Path(path)
        readers = {".toml": cls.from_toml, ".json": cls.from_json}
        if path.suffix not in readers:
            _fail("path", str(path), "a file ending in .toml or .json")
        return readers[path.suffix](path.read_text(encoding="utf-8"))

    def replace(self, **changes: Any) -> MuonConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any], where: str = "overrides") -> MuonConfig:
        """A copy with MuonConfig fields replaced, as every backend merges user overrides.

        `adamw` may be a partial mapping: the AdamW fields it does not name keep their values
        (`replace(adamw={...})` would reset them to the defaults). `where` starts the error
        message for an unknown key.
        """
        check_fields(MuonConfig, overrides, where)
        overrides = dict(overrides)
        if isinstance(overrides.get("adamw"), Mapping):
            overrides["adamw"] = self.adamw.with_overrides(overrides["adamw"],
                                                           f"{where}['adamw']")
        return self.replace(**overrides)
