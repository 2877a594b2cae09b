"""QK-clip (MuonClip): after the optimizer step, shrink the query and key weights of every
attention head whose largest pre-softmax logit exceeded a threshold.

For a head h with largest logit `S(h) > tau`, `gamma = tau / S(h)`: the head's query rows are
multiplied by `gamma ** alpha` and its key rows by `gamma ** (1 - alpha)`, so the logits the
same inputs produce shrink by exactly `gamma`. A key head shared by several query heads (GQA)
takes the largest of their logits. With multi-head latent attention, the rotary part of each
query head meets a key part shared by every head, which is left alone: that query part takes
the whole `gamma`.

Everything here works on Array API arrays; backends call `qk_clip_scales` and multiply.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

from array_api_compat import array_namespace, device

from muon_core._config import MuonConfig
from muon_core._architectures import FUSED_QKV, components as _components
from muon_core._plan import ParamPlan, Plan, plan as make_plan

ROLES = ("query", "key", "qkv", "none")
QUERY_NAMES = frozenset({"q_proj", "wq", "query", "q", "query_proj", "to_q", "q_lin"})
KEY_NAMES = frozenset({"k_proj", "wk", "key", "k", "key_proj", "to_k", "k_lin"})


def _check_dim(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r} is invalid: expected a non-negative int")


@dataclasses.dataclass(frozen=True)
class QKRule:
    """Says what a parameter is for QK-clip, overriding the name conventions.

    `match` is an fnmatch glob on the parameter name; `role` is "query", "key", "qkv" (fused:
    the plan's first block is Q, the second K) or "none" (never scaled, e.g. a shared rotary
    key). `rope_dim`: trailing rows of each query head that meet a shared rotary key (MLA).
    `value_dim`: trailing rows of each key head that are values (MLA's fused key/value
    up-projection), left alone.
    """

    match: str
    role: str
    rope_dim: int = 0
    value_dim: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise ValueError(f"qk_clip.rules.match={self.match!r} is invalid: expected a "
                             "non-empty glob string")
        if self.role not in ROLES:
            raise ValueError(f"qk_clip.rules.role={self.role!r} is invalid: expected one of "
                             f"{list(ROLES)}")
        _check_dim("qk_clip.rules.rope_dim", self.rope_dim)
        _check_dim("qk_clip.rules.value_dim", self.value_dim)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class QKClipConfig:
    """QK-clip settings: `threshold` (tau > 0), `alpha` in [0, 1] (the query's share of the
    scale) and `rules` (`QKRule`s, or mappings) for parameters the names do not describe."""

    threshold: float = 100.0
    alpha: float = 0.5
    rules: tuple[QKRule, ...] = ()

    def __post_init__(self) -> None:
        from muon_core._config import _check_number, _unknown_keys

        _check_number("qk_clip.threshold", self.threshold, low=0.0, low_open=True)
        _check_number("qk_clip.alpha", self.alpha, low=0.0, high=1.0)
        rules = []
        for rule in self.rules:
            if isinstance(rule, Mapping):
                _unknown_keys(QKRule, rule)
                rule = QKRule(**rule)
            if not isinstance(rule, QKRule):
                raise ValueError(f"qk_clip.rules entry {rule!r} is invalid: expected a QKRule "
                                 "or a mapping")
            rules.append(rule)
        object.__setattr__(self, "rules", tuple(rules))

    @classmethod
    def from_value(cls, value: Any) -> QKClipConfig | None:
        """None, a `QKClipConfig`, or a mapping of its fields (unknown keys refused)."""
        if value is None or isinstance(value, QKClipConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"qk_clip={value!r} is invalid: expected None, a QKClipConfig or "
                             "a mapping such as {'threshold': 100.0, 'alpha': 0.5}")
        from muon_core._config import _unknown_keys

        _unknown_keys(cls, value)
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (rules only when there are some, as TOML has no empty table)."""
        out: dict[str, Any] = {"threshold": self.threshold, "alpha": self.alpha}
        if self.rules:
            out["rules"] = [rule.to_dict() for rule in self.rules]
        return out


# -- which parameters are queries and keys -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QKTarget:
    """A parameter QK-clip rescales, seen as `(batch, rows)` output rows (batch-major), each
    batch item's rows cut into `blocks` (Q, K, V for a fused one).

    `perm` orders the axes as (batch..., out..., in...); the first `n_row_axes` of them hold
    the rows, so a `(batch, rows)` scale reshaped to those sizes, padded with unit axes and
    permuted back broadcasts against the parameter.
    """

    name: str
    layer: str
    role: str
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    n_row_axes: int
    batch: int
    blocks: tuple[int, ...]
    rope_dim: int = 0
    value_dim: int = 0

    @property
    def rows(self) -> int:
        """Rows per batch item."""
        return sum(self.blocks)

    def part(self, role: str) -> tuple[int, int]:
        """The `(start, size)` rows of the query or key part within each batch item."""
        if self.role != "qkv":
            return 0, self.rows
        return (0, self.blocks[0]) if role == "query" else (self.blocks[0], self.blocks[1])

    def features(self, role: str) -> int:
        """How many query or key features the parameter holds."""
        return self.batch * self.part(role)[1]


def _row_view(entry: ParamPlan, layout: str) -> tuple[tuple[int, ...], int, int, int]:
    """`(perm, n_row_axes, batch, rows)` of a parameter: the plan's matrix view for a Muon
    entry, else the layout's output axis (all of a 1-D tensor)."""
    shape = entry.shape
    if entry.is_muon:
        batch, rows, cols = entry.matrix_shape
        permuted, n_in, size = entry.permuted_shape, 0, 1
        while size != cols:
            n_in += 1
            size *= permuted[-n_in]
        return entry.perm, len(shape) - n_in, batch, rows
    if len(shape) == 0:
        raise ValueError(f"parameter {entry.name!r} is a scalar: QK-clip needs query or key "
                         "rows")
    out_axis = 0 if layout == "out_in" else len(shape) - 1
    perm = (out_axis,) + tuple(a for a in range(len(shape)) if a != out_axis)
    return perm, 1, 1, shape[out_axis]


def _layer_of(name: str, layers: Mapping[tuple[str, ...], str]) -> tuple[str, list[str]] | None:
    """The longest reported layer whose name is a prefix of `name` ("" for the whole model),
    and the components after it."""
    parts = _components(name)
    for cut in range(len(parts) - 1, -1, -1):
        layer = layers.get(tuple(parts[:cut]))
        if layer is not None:
            return layer, parts[cut:]
    return None


def _role_by_name(rest: list[str]) -> str | None:
    for part in rest:
        if part in FUSED_QKV:
            return "qkv"
        if part in QUERY_NAMES:
            return "query"
        if part in KEY_NAMES:
            return "key"
    return None


def _sibling_blocks(name: str, entries: Mapping[str, ParamPlan], size: int) -> tuple | None:
    """`(batch, blocks)` of a Muon weight in the same module as `name` holding `size` rows."""
    module = name.rpartition(".")[0]
    for other in entries.values():
        if (other.is_muon and other.name.rpartition(".")[0] == module
                and other.matrix_shape[0] * other.matrix_shape[1] == size):
            return other.matrix_shape[0], other.blocks
    return None


def _target(entry: ParamPlan, layer: str, role: str, rule: QKRule | None, plan: Plan,
            layout: str) -> QKTarget:
    if entry.is_muon and entry.view_shape not in ((), entry.shape):
        raise ValueError(f"parameter {entry.name!r} with shape {entry.shape} stores Q, K and V "
                         f"rows interleaved per head (plan view {entry.view_shape}): QK-clip "
                         "needs contiguous Q and K rows; route it with a QKRule role='none' "
                         "or store Q and K separately")
    perm, n_row_axes, batch, rows = _row_view(entry, layout)
    blocks = entry.blocks if entry.is_muon else (rows,)
    if not entry.is_muon and role == "qkv":
        batch, blocks = _sibling_blocks(entry.name, {e.name: e for e in plan}, rows) \
            or (batch, blocks)
    if role == "qkv" and len(blocks) < 2:
        raise ValueError(f"fused QKV parameter {entry.name!r} with shape {entry.shape} has "
                         f"blocks={tuple(blocks)} in the plan: expected Q, K (and V) blocks; "
                         "route it to Muon with split_qkv=True or a Rule with split=(q, k, v)")
    if role != "qkv":
        blocks = (rows,)
    return QKTarget(entry.name, layer, role, entry.shape, perm, n_row_axes, batch,
                    tuple(blocks), rule.rope_dim if rule else 0, rule.value_dim if rule else 0)


def qk_targets(plan: Plan, layers: Any, qk: QKClipConfig, *, layout: str = "out_in"
               ) -> list[QKTarget]:
    """The parameters QK-clip rescales for the attention `layers` (names whose per-head logits
    are reported): those under a layer's name that a rule or their name marks as query, key
    or fused QKV. Each layer must get a query part and a key part."""
    layers = {tuple(_components(layer)): layer for layer in layers}
    targets = []
    for entry in plan:
        found = _layer_of(entry.name, layers)
        if found is None:
            continue
        layer, rest = found
        rule = next((r for r in qk.rules if fnmatch.fnmatchcase(entry.name, r.match)), None)
        role = rule.role if rule is not None else _role_by_name(rest)
        if role is not None and role != "none":
            targets.append(_target(entry, layer, role, rule, plan, layout))
    for key, layer in layers.items():
        roles = {t.role for t in targets if t.layer == layer}
        for part, names in (("query", QUERY_NAMES), ("key", KEY_NAMES)):
            if not roles & {part, "qkv"}:
                under = [e.name for e in plan if _layer_of(e.name, {key: layer})]
                raise ValueError(f"attention layer {layer!r} has no {part} parameter among "
                                 f"{under}: expected a name such as {sorted(names)[:4]} or a "
                                 f"fused QKV name, or a qk_clip rule with role={part!r} or "
                                 "'qkv'")
    return targets


# -- the scales --------------------------------------------------------------------------------

def _gamma(s: Any, tau: float, xp: Any) -> Any:
    """`tau / s` where `s > tau`, else 1 (no division by a small or negative `s`)."""
    over = s > tau
    return xp.where(over, tau / xp.where(over, s, tau), xp.ones_like(s))


def _heads(layer: str, s_max: Any, queries: list[QKTarget], keys: list[QKTarget]
           ) -> tuple[int, int, int, int, int]:
    """`(query heads, query head size, rope rows, key heads, key head size)`, validated."""
    n_q = int(s_max.shape[0])
    q_features = {t.features("query") for t in queries}
    k_features = {t.features("key") for t in keys}
    if len(q_features) != 1 or len(k_features) != 1:
        raise ValueError(f"attention layer {layer!r}: its query parameters "
                         f"{[t.name for t in queries]} or key parameters "
                         f"{[t.name for t in keys]} disagree on their number of rows "
                         f"({sorted(q_features)}, {sorted(k_features)}): expected one each")
    (fq,), (fk,) = q_features, k_features
    rope = max(t.rope_dim for t in queries)
    values = max(t.value_dim for t in keys)
    if n_q == 0 or fq % n_q or fq // n_q <= rope:
        raise ValueError(f"attention layer {layer!r}: {fq} query rows cannot hold "
                         f"{n_q} heads (len(qk_max[{layer!r}])={n_q}) with rope_dim={rope}: "
                         "expected one logit per query head")
    d_q = fq // n_q
    d_k = d_q - rope + values
    if fk % d_k or n_q % (fk // d_k):
        raise ValueError(f"attention layer {layer!r}: {fk} key rows are not a whole number of "
                         f"key heads of {d_k} rows dividing the {n_q} query heads "
                         f"(query head size {d_q}, rope_dim={rope}, value_dim={values})")
    return n_q, d_q, rope, fk // d_k, d_k


def _per_row(head_factors: list[tuple[Any, int]], xp: Any) -> Any:
    """One value per row: each `(factor per head, rows)` pair in turn within every head."""
    n = head_factors[0][0].shape[0]
    return xp.reshape(xp.concat([xp.broadcast_to(f[:, None], (n, rows))
                                 for f, rows in head_factors if rows], axis=1), (-1,))


def _layer_rows(s_max: Any, n_kv: int, d_q: int, rope: int, d_k: int, qk: QKClipConfig, xp: Any
                ) -> tuple[Any, Any]:
    """The scale of every query row and every key row of one layer."""
    gamma = _gamma(s_max, qk.threshold, xp)
    query = _per_row([(gamma ** qk.alpha, d_q - rope), (gamma, rope)], xp)
    shared = xp.max(xp.reshape(s_max, (n_kv, -1)), axis=1)  # GQA: the group's largest logit
    key_factor = _gamma(shared, qk.threshold, xp) ** (1.0 - qk.alpha)
    key = _per_row([(key_factor, d_q - rope), (xp.ones_like(key_factor), d_k - d_q + rope)], xp)
    return query, key


def _broadcastable(target: QKTarget, rows: Any, xp: Any) -> Any:
    """A `(batch, rows)` scale as an array that broadcasts against the parameter."""
    permuted = tuple(target.shape[a] for a in target.perm)
    sizes = permuted[:target.n_row_axes] + (1,) * (len(permuted) - target.n_row_axes)
    inverse = tuple(sorted(range(len(target.perm)), key=target.perm.__getitem__))
    return xp.permute_dims(xp.reshape(rows, sizes), inverse)


def _target_rows(target: QKTarget, query: Any, key: Any, xp: Any) -> Any:
    if target.role == "query":
        return query
    if target.role == "key":
        return key
    b = target.batch
    pieces = [xp.reshape(query, (b, -1)), xp.reshape(key, (b, -1))]
    rest = target.rows - sum(target.blocks[:2])
    if rest:
        pieces.append(xp.ones((b, rest), dtype=query.dtype, device=device(query)))
    return xp.concat(pieces, axis=1)


def check_qk_max(qk_max: Mapping[str, Any]) -> None:
    """Raise ValueError naming the layer when a reported logit is NaN or infinite."""
    for layer, s in qk_max.items():
        xp = array_namespace(s)
        if not bool(xp.all(xp.isfinite(s))):
            raise ValueError(f"qk_max[{layer!r}] holds NaN or Inf: expected finite logits; "
                             "nothing was rescaled")


def qk_clip_scales(plan: Plan, qk_max: Mapping[str, Any], config: Any, *,
                   layout: str = "out_in", check: bool = True) -> dict[str, Any]:
    """For each parameter QK-clip rescales, an array (in the dtype of the logits) that
    broadcasts against it: multiply the parameter by it to clip.

    `qk_max` maps attention layer names (prefixes of their parameters' names) to the largest
    pre-softmax logit of each query head in the step, shape `(query heads,)`. `config` is a
    `MuonConfig` with `qk_clip` set (or a `QKClipConfig`). With `check`, non-finite logits
    raise ValueError before anything is computed.
    """
    qk = getattr(config, "qk_clip", config)
    if not isinstance(qk, QKClipConfig):
        raise ValueError(f"qk_clip={qk!r} is invalid: QK-clip is off in this config; set "
                         "qk_clip={'threshold': 100.0, 'alpha': 0.5} in MuonConfig")
    if check:
        check_qk_max(qk_max)
    targets = qk_targets(plan, qk_max, qk, layout=layout)
    scales = {}
    for layer, s_max in qk_max.items():
        xp = array_namespace(s_max)
        s_max = xp.reshape(s_max, (-1,))
        mine = [t for t in targets if t.layer == layer]
        queries = [t for t in mine if t.role in ("query", "qkv")]
        keys = [t for t in mine if t.role in ("key", "qkv")]
        n_q, d_q, rope, n_kv, d_k = _heads(layer, s_max, queries, keys)
        query, key = _layer_rows(s_max, n_kv, d_q, rope, d_k, qk, xp)
        for t in mine:
            rows = xp.reshape(_target_rows(t, query, key, xp), (t.batch, t.rows))
            scales[t.name] = _broadcastable(t, rows, xp)
    return scales


def qk_clip(params: Mapping[str, Any], qk_max: Mapping[str, Any], config: Any,
            plan: Plan | None = None, *, layout: str = "out_in") -> dict[str, Any]:
    """The reference QK-clip: new parameters with the query and key rows of every head whose
    largest logit exceeded `config.qk_clip.threshold` scaled down (see `qk_clip_scales`);
    the inputs are not modified."""
    if plan is None:
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        plan = make_plan(shapes, config if isinstance(config, MuonConfig) else None,
                         layout=layout)
    out = dict(params)
    for name, scale in qk_clip_scales(plan, qk_max, config, layout=layout).items():
        xp = array_namespace(params[name])
        out[name] = params[name] * xp.astype(scale, params[name].dtype)
    return out


def max_logits(q: Any, k: Any, *, scale: float | None = None, mask: Any = None,
               heads_axis: int = -3) -> Any:
    """The largest pre-softmax logit `scale * q . k` of each query head, shape `(query heads,)`.

    `q`: `(..., heads, queries, dim)` and `k`: `(..., kv_heads, keys, dim)` with heads on
    `heads_axis` (-3 as torch's attention, -2 for `(..., length, heads, dim)` as flax). With
    fewer key heads (GQA), query head h meets key head `h // (heads // kv_heads)`. `scale`
    defaults to `1/sqrt(dim)`; `mask` (True where a query may attend) broadcasts against
    `(..., heads, queries, keys)`.
    """
    xp = array_namespace(q, k)
    q, k = _heads_third_last(q, heads_axis, "q"), _heads_third_last(k, heads_axis, "k")
    n_q, n_kv = q.shape[-3], k.shape[-3]
    if q.shape[-1] != k.shape[-1] or n_kv == 0 or n_q % n_kv:
        raise ValueError(f"q.shape={tuple(q.shape)} and k.shape={tuple(k.shape)} do not fit: "
                         "expected the same head size and key heads dividing the query heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = xp.reshape(q, q.shape[:-3] + (n_kv, n_q // n_kv) + q.shape[-2:])
    keys = xp.reshape(k, k.shape[:-3] + (n_kv, 1) + k.shape[-2:])
    logits = xp.matmul(groups, xp.matrix_transpose(keys)) * scale
    logits = xp.reshape(logits, logits.shape[:-4] + (n_q,) + logits.shape[-2:])
    if mask is not None:
        logits = xp.where(mask, logits, xp.asarray(-math.inf, dtype=logits.dtype))
    heads_first = _heads_third_last(logits, -3, "logits", to=0)
    return xp.max(xp.reshape(heads_first, (n_q, -1)), axis=1)


def _heads_third_last(x: Any, axis: int, what: str, to: int = -3) -> Any:
    """`x` with its `axis` moved to position `to`."""
    if x.ndim < 3 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{what}.shape={tuple(x.shape)} is invalid for heads_axis={axis}: "
                         "expected at least (heads, length, dim)")
    xp = array_namespace(x)
    order = [a for a in range(x.ndim) if a != axis % x.ndim]
    order.insert(to % x.ndim, axis % x.ndim)
    return xp.permute_dims(x, tuple(order))
