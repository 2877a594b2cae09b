"""The routing plan: for each parameter, which algorithm, which matrix view, which LR scale, and why."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence

from muon_core import _architectures as arch
from muon_core._config import ALGORITHMS, LAYOUTS, LR_SCALINGS, MuonConfig, Rule

MODULE_KINDS = ("embedding", "head", "hidden", "norm", "other")
# A matrix routed to Muon by shape alone is flagged when one side is this many times the other
# (an output head or embedding table looks like this; its original LR scale is >= 2.8).
FLAG_ASPECT = 8


def lr_scale(rows: int, cols: int, scaling: str) -> float:
    """The LR multiplier of an (out=rows, in=cols) matrix under the given `lr_scaling`."""
    if scaling == "original":
        return math.sqrt(max(1.0, rows / cols))
    if scaling == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if scaling == "spectral":
        return math.sqrt(rows / cols)
    if scaling == "none":
        return 1.0
    raise ValueError(f"lr_scaling={scaling!r} is invalid: expected one of {list(LR_SCALINGS)}")


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """One parameter's decision.

    For Muon parameters the tensor is viewed as a batch of matrices: reshaped to `view_shape`
    (the shape itself unless interleaved blocks split the output axis), its axes permuted by
    `perm` to (batch..., out..., in...) and reshaped to `matrix_shape = (batch, rows, cols)`;
    the rows are cut into `blocks` (fused QKV), each orthogonalized alone with its
    `lr_scales`. `notes` say how the view and split were chosen; `flags` are warnings for the
    plan table (a decision that may be wrong, a split left undone).
    """

    name: str
    shape: tuple[int, ...]
    algorithm: str
    decided_by: str
    why: str
    perm: tuple[int, ...] = ()
    matrix_shape: tuple[int, int, int] = (0, 0, 0)
    blocks: tuple[int, ...] = ()
    lr_scales: tuple[float, ...] = ()
    view_shape: tuple[int, ...] = ()
    groups: int = 1
    notes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def is_muon(self) -> bool:
        """Whether Muon updates this parameter."""
        return self.algorithm == "muon"

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        """The shape after the view and `perm`, before the reshape to `matrix_shape`."""
        view = self.view_shape or self.shape
        return tuple(view[i] for i in self.perm)

    @property
    def inverse_perm(self) -> tuple[int, ...]:
        """The permutation that undoes `perm`."""
        return tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))

    @property
    def block_offsets(self) -> tuple[int, ...]:
        """Start row of each block."""
        starts, total = [], 0
        for size in self.blocks:
            starts.append(total)
            total += size
        return tuple(starts)

    def reshape_text(self) -> str:
        """A short description of the matrix view, for the plan table."""
        if not self.is_muon:
            return "-"
        batch, rows, cols = self.matrix_shape
        view = f"{rows}x{cols}" if batch == 1 else f"{batch}x({rows}x{cols})"
        if self.perm != tuple(range(len(self.perm))):
            view = f"perm{list(self.perm)} -> {view}"
        if len(self.blocks) > 1:
            view += " split " + "+".join(map(str, self.blocks))
            view += f" in {self.groups} groups" if self.groups > 1 else ""
        return view


@dataclasses.dataclass(frozen=True)
class _Hints:
    """What is known of one parameter: module kind, layout and (query, key/value) heads from
    the backend; from the whole model's names, a router's reason and an expert tensor's layout."""

    kind: str | None = None
    layout: str | None = None
    heads: tuple[int, int] | None = None
    router: str | None = None
    experts: str | None = None


def _rule_applies(rule: Rule, name: str, shape: tuple[int, ...]) -> bool:
    return (fnmatch.fnmatchcase(name, rule.match)
            and (rule.ndim is None or rule.ndim == len(shape))
            and (rule.shape is None or tuple(rule.shape) == shape))


def _first(rules: list[Rule], field: str) -> Rule | None:
    return next((r for r in rules if getattr(r, field) is not None), None)


def _normalise_axes(axes: Sequence[int], ndim: int, name: str, what: str) -> tuple[int, ...]:
    out = tuple(a % ndim if -ndim <= a < ndim else None for a in axes)
    if None in out or len(set(out)) != len(out):
        raise ValueError(f"parameter {name!r}: {what}={tuple(axes)} is invalid for a {ndim}-D "
                         "tensor: expected distinct axes in range")
    return out


def _default_axes(ndim: int, layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Output and input axes: torch puts `out` first, flax puts it last."""
    if layout == "out_in":
        return (0,), tuple(range(1, ndim))
    return (ndim - 1,), tuple(range(ndim - 1))


def _axes(name: str, shape: tuple[int, ...], rules: list[Rule], layout: str,
          experts: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    dims = _first(rules, "out_axes")
    if dims is None and experts is not None:
        return ((1,), (2,)) if experts == "out_in" else ((2,), (1,))
    if dims is None:
        return arch.per_head_axes(name, shape, layout) or _default_axes(len(shape), layout)
    out_axes = _normalise_axes(dims.out_axes, len(shape), name, "out_axes")
    in_axes = _normalise_axes(dims.in_axes, len(shape), name, "in_axes")
    if set(out_axes) & set(in_axes):
        raise ValueError(f"parameter {name!r}: out_axes={out_axes} and in_axes={in_axes} "
                         "overlap: expected disjoint axes")
    return out_axes, in_axes


def _split(name: str, rows: int, cols: int, rules: list[Rule], config: MuonConfig,
           hints: _Hints) -> tuple[tuple[int, ...], int, str | None, str | None]:
    """(blocks, groups, note, flag): a rule's split, else a known fused Q/K/V or gate/up
    layout."""
    rule = _first(rules, "split")
    if rule is not None:
        if sum(rule.split) != rows:
            raise ValueError(f"parameter {name!r}: split={rule.split} sums to "
                             f"{sum(rule.split)}, expected the output size {rows}")
        return rule.split, rule.groups or 1, f"split by rule match={rule.match!r}", None
    if hints.experts is not None and config.split_qkv:
        blocks, text = arch.gate_up_split(name, rows, hints.experts)
        if blocks is not None:
            return blocks, 1, text, None
        return (rows,), 1, None, text or None
    heads = hints.heads
    kind = arch.qkv_kind(name) if config.split_qkv else None
    if kind is None:
        return (rows,), 1, None, None
    known = arch.fused_qkv_blocks(kind, rows, cols, heads)
    if known is None:
        return (rows,), 1, None, arch.qkv_rule_hint(name, kind, rows)
    blocks, groups = known
    source = f"{heads[0]} heads, {heads[1]} key/value heads" if heads else "equal thirds"
    return blocks, groups, f"fused Q/K/V, {kind} ({source})", None


def _muon_entry(name: str, shape: tuple[int, ...], decided_by: str, why: str,
                rules: list[Rule], config: MuonConfig, layout: str, layout_note: str | None,
                hints: _Hints) -> ParamPlan:
    ndim = len(shape)
    out_axes, in_axes = _axes(name, shape, rules, layout, hints.experts)
    if hints.experts is not None and _first(rules, "out_axes") is None:
        layout_note = f"one matrix per expert, stored {hints.experts}"
    batch = math.prod(shape[a] for a in range(ndim) if a not in out_axes + in_axes)
    rows = math.prod(shape[a] for a in out_axes)
    cols = math.prod(shape[a] for a in in_axes)
    blocks, groups, split_note, flag = _split(name, rows, cols, rules, config, hints)
    view = shape
    if groups > 1:
        if len(out_axes) != 1:
            raise ValueError(f"parameter {name!r}: groups={groups} needs a single output axis, "
                             f"got out_axes={out_axes}")
        view, grouped = arch.grouped_view(shape, out_axes[0], blocks, groups)
        shift = {a: a + 2 if a > out_axes[0] else a for a in range(ndim)}
        out_axes, in_axes = grouped, tuple(shift[a] for a in in_axes)
    batch_axes = tuple(a for a in range(len(view)) if a not in out_axes + in_axes)
    scales = tuple(lr_scale(b, cols, config.lr_scaling) for b in blocks)
    notes = tuple(n for n in (layout_note, split_note) if n)
    flags = (flag,) if flag else ()
    if decided_by == "shape" and max(rows, cols) >= FLAG_ASPECT * min(rows, cols):
        flags += (f"{rows}x{cols} matrix routed to Muon by shape alone: an output head or "
                  "embedding? If so add a rule with algorithm = 'adamw'",)
    return ParamPlan(name, shape, "muon", decided_by, why, batch_axes + out_axes + in_axes,
                     (batch, rows, cols), tuple(blocks), scales, view, groups, notes, flags)


def _is_depthwise(shape: tuple[int, ...], layout: str) -> bool:
    """A convolution kernel with one input channel per filter (torch (C, 1, k...))."""
    return len(shape) >= 3 and shape[1 if layout == "out_in" else -2] == 1


def _decide(name: str, shape: tuple[int, ...], rules: list[Rule], group_algorithm: str | None,
            hints: _Hints, layout: str) -> tuple[str, str, str]:
    """Return (algorithm, decided_by, why), most explicit layer first."""
    if group_algorithm is not None:
        return group_algorithm, "group", f"param group asks for {group_algorithm}"
    for rule in rules:
        if rule.algorithm is not None:
            return rule.algorithm, "rule", f"rule match={rule.match!r}"
    if len(shape) < 2 or 0 in shape:
        return "adamw", "shape", f"{len(shape)}-D tensor" if 0 not in shape else "empty tensor"
    if hints.kind in ("embedding", "head", "norm", "other"):
        return "adamw", "module", f"{hints.kind} module"
    if hints.router is not None:
        return "adamw", "name", hints.router
    if hints.kind == "hidden":
        return "muon", "module", "hidden layer module"
    by_name = arch.name_kind(name)
    if by_name is not None:
        return "adamw", "name", by_name[1]
    if _first(rules, "out_axes") is None and _is_depthwise(shape, layout):
        return "adamw", "shape", "depthwise convolution (one input channel per filter)"
    return "muon", "shape", f"{len(shape)}-D matrix, by shape alone"


def _layout(name: str, rules: list[Rule], hints: _Hints, layout: str) -> tuple[str, str | None]:
    rule = _first(rules, "layout")
    if rule is not None:
        return rule.layout, f"layout {rule.layout} by rule match={rule.match!r}"
    if hints.layout is not None and hints.layout != layout:
        return hints.layout, f"layout {hints.layout} from the module"
    return layout, None


def plan_param(name: str, shape: Sequence[int], config: MuonConfig, *, layout: str = "out_in",
               group_algorithm: str | None = None, module_kind: str | None = None,
               param_layout: str | None = None, heads: tuple[int, int] | None = None,
               router: str | None = None, experts: str | None = None) -> ParamPlan:
    """Decide one parameter; see `plan` (`param_layout`, `heads`, `router` and `experts` are
    what is known of it by name)."""
    shape = tuple(int(s) for s in shape)
    for what, value in (("layout", layout), ("param_layout", param_layout)):
        if value is not None and value not in LAYOUTS:
            raise ValueError(f"{what}={value!r} is invalid: expected one of {list(LAYOUTS)}")
    if group_algorithm is not None and group_algorithm not in ALGORITHMS:
        raise ValueError(f"parameter {name!r}: algorithm={group_algorithm!r} is invalid: "
                         f"expected one of {list(ALGORITHMS)}")
    if module_kind is not None and module_kind not in MODULE_KINDS:
        raise ValueError(f"parameter {name!r}: module kind {module_kind!r} is invalid: "
                         f"expected one of {list(MODULE_KINDS)}")
    hints = _Hints(module_kind, param_layout, heads, router, experts)
    rules = [r for r in config.rules if _rule_applies(r, name, shape)]
    layout, layout_note = _layout(name, rules, hints, layout)
    algorithm, decided_by, why = _decide(name, shape, rules, group_algorithm, hints, layout)
    if algorithm == "adamw":
        return ParamPlan(name, shape, "adamw", decided_by, why)
    if len(shape) < 2 or 0 in shape:
        raise ValueError(f"parameter {name!r} with shape {shape} is routed to muon by "
                         f"{decided_by} ({why}), but Muon needs a tensor with ndim >= 2 "
                         "and no empty axis")
    entry = _muon_entry(name, shape, decided_by, why, rules, config, layout, layout_note, hints)
    if decided_by not in ("group", "rule") and 1 in entry.matrix_shape[1:]:
        _, rows, cols = entry.matrix_shape
        return ParamPlan(name, shape, "adamw", "shape", f"{rows}x{cols} matrix view is a vector")
    return entry


@dataclasses.dataclass(frozen=True)
class Plan:
    """The routing decision for every parameter of a model, in order."""

    entries: tuple[ParamPlan, ...]
    config: MuonConfig
    # The backend's `describe_ns_dtype` for its device: shown, not part of the decision.
    ns_dtype_note: str | None = dataclasses.field(default=None, compare=False)

    def __iter__(self) -> Iterator[ParamPlan]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> ParamPlan:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no parameter named {name!r} in the plan")

    @property
    def muon(self) -> tuple[ParamPlan, ...]:
        """Entries routed to Muon."""
        return tuple(e for e in self.entries if e.is_muon)

    @property
    def adamw(self) -> tuple[ParamPlan, ...]:
        """Entries routed to AdamW."""
        return tuple(e for e in self.entries if not e.is_muon)

    def ns_batches(self) -> dict[tuple[int, int], list[tuple[str, int]]]:
        """Blocks grouped by matrix shape `(rows, cols)`: each group is one batched NS call."""
        groups: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for entry in self.muon:
            for index, rows in enumerate(entry.blocks):
                groups.setdefault((rows, entry.matrix_shape[2]), []).append((entry.name, index))
        return groups

    def table(self) -> str:
        """A fixed-width table (name, shape, algorithm, matrix view, LR scale, decided by, why),
        then one line per warning: flagged entries are marked "!" in the table."""
        header = ("name", "shape", "algorithm", "matrix view", "lr scale", "decided by", "why")
        rows = [header]
        for e in self.entries:
            scales = "/".join(f"{s:.3g}" for s in dict.fromkeys(e.lr_scales)) or "-"
            why = "; ".join((e.why, *e.notes)) + (" !" if e.flags else "")
            rows.append((e.name, "x".join(map(str, e.shape)) or "scalar", e.algorithm,
                         e.reshape_text(), scales, e.decided_by, why))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_muon = sum(math.prod(e.shape) for e in self.muon)
        total = n_muon + sum(math.prod(e.shape) for e in self.adamw)
        lines.append(f"{len(self.muon)} of {len(self)} tensors ({n_muon:,} of {total:,} "
                     f"values) use Muon; lr_scaling={self.config.lr_scaling!r}; "
                     f"{self.ns_dtype_note or f'ns_dtype={self.config.ns_dtype!r}'}")
        lines += [f"! {e.name}: {flag}" for e in self.entries for flag in e.flags]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def plan(shapes: Mapping[str, Sequence[int]], config: MuonConfig | None = None, *,
         layout: str = "out_in", algorithms: Mapping[str, str] | None = None,
         module_kinds: Mapping[str, str] | None = None,
         layouts: Mapping[str, str] | None = None,
         heads: Mapping[str, tuple[int, int]] | None = None) -> Plan:
    """Route every parameter of a model to Muon or AdamW and describe its matrix view.

    `shapes` maps parameter names to shapes. `layout` says where the output axis is:
    "out_in" (torch `Linear.weight`, conv `(out, in, kh, kw)`) or "in_out" (flax `Dense.kernel`,
    conv `(kh, kw, in, out)`); the same layer gets the same LR scale in both. Decisions, most
    explicit first: `algorithms` (from param groups), `config.rules`, then 0/1-D tensors to
    AdamW, `module_kinds` (what the backend saw: "embedding", "head", "hidden", "norm",
    "other"), known embedding/head names anywhere in the path, depthwise convolutions to
    AdamW, then every other matrix to Muon (by shape alone: flagged when it looks like a head).

    The backend may also say what it knows per name: `layouts` (a weight stored the other way
    round, such as GPT-2's Conv1D (in, out)) and `heads` ((query heads, key/value heads) of a
    fused Q/K/V projection, so it can be split). Without them, weights named like GPT-2's
    Conv1D are read (in, out) when c_attn's shape says so, and a known fused Q/K/V name is
    split only where its sizes are certain; otherwise it stays whole and the table says which
    rule to write.
    """
    config = MuonConfig() if config is None else config
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must map parameter names to shapes, got {type(shapes).__name__}")
    algorithms, module_kinds, heads = algorithms or {}, module_kinds or {}, heads or {}
    layouts = dict(layouts or {})
    if layout == "out_in":
        known = arch.gpt2_conv1d_names(shapes)
        layouts = {n: "in_out" for n in known if n not in module_kinds} | layouts
    routers, experts = arch.moe_routers(shapes), arch.expert_layouts(shapes, layout)
    entries = tuple(plan_param(name, shape, config, layout=layout,
                               group_algorithm=algorithms.get(name),
                               module_kind=module_kinds.get(name),
                               param_layout=layouts.get(name), heads=heads.get(name),
                               router=routers.get(name), experts=experts.get(name))
                    for name, shape in shapes.items())
    return Plan(entries, config)
